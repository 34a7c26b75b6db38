//! One core's event loop: listeners, connection driver, mesh endpoints and ticker around one
//! [`Shard`] state machine.
//!
//! Everything here is owned by this core's thread (`Rc`, `RefCell`); the only things that cross
//! threads are the batches of [`ShardMsg`] on the channel mesh. After every call into the state
//! machine, [`Core::dispatch`] queues connections with output for the driver, starts closing the
//! connections it asked to close, and appends cross-shard messages to per-peer batches that one
//! sender task per peer ships — one channel operation per batch, not per message.

use sluice_core::HashMap;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use sluice_core::bridge::{Delivery, KafkaRecord, MappingConfig, ProduceError, ProduceRequest, ProduceResult, Router};
use sluice_core::config::Limits;
use sluice_core::shard::{Shard, ShardMsg};
use tokio::sync::mpsc;

use crate::conns::{self, Conns};
use crate::notify::Notify;
use crate::store::{RetainedStore, SessionStore};

pub(crate) struct ShardConfig {
    pub id: usize,
    pub n_shards: usize,
    pub listen: SocketAddr,
    pub own_listen: Option<SocketAddr>,
    pub limits: Limits,
    pub sys_interval_ms: u64,
    pub data_dir: std::path::PathBuf,
    pub release_memory: fn(),
    pub epoch: Instant,
    pub bridge: Option<ShardBridge>,
}

/// This shard's end of the MQTT → Kafka bridge.
pub(crate) struct ShardBridge {
    pub mappings: Vec<MappingConfig>,
    pub inbound: Vec<sluice_core::inbound::InboundMappingConfig>,
    pub inbound_rx: mpsc::Receiver<Vec<sluice_core::inbound::InboundRecord>>,
    /// Where this shard stores its Kafka → MQTT consumer positions.
    pub positions_file: std::path::PathBuf,
    pub clusters: Vec<String>,
    pub max_pending: usize,
    pub inbound_max_wait_ms: u64,
    pub delivery: Delivery,
    pub spill_on_timeout: bool,
    pub qos0_when_backlogged: sluice_core::config::Qos0Policy,
    /// The spill log's directory and options (local-durable records, and kafka-ack records that timed out).
    pub spill: Option<(std::path::PathBuf, sluice_storage::LogOptions)>,
    pub requests: mpsc::Sender<Vec<ProduceRequest>>,
    pub results: mpsc::UnboundedReceiver<Vec<ProduceResult>>,
}

/// Ids of records replayed from the spill log: outside the state machine's id space, so their
/// results confirm the log and go no further.
const REPLAY_ID: u64 = 1 << 63;

/// This shard's spill log (local-durable delivery, kafka-ack outages) and what it is waiting for.
struct Spill {
    log: RefCell<sluice_storage::Log>,
    clusters: Vec<String>,
    /// Record id → its sequence number in the log, until Kafka answers.
    seq_of: RefCell<HashMap<u64, u64>>,
    /// Appended, not yet covered by a group commit: (id, seq), in order.
    awaiting_sync: RefCell<VecDeque<(u64, u64)>>,
    sync_ready: Notify,
    last_cursor_write: Cell<Option<Instant>>,
    /// Durable records handed to Kafka and not answered yet, and the most there may be; records
    /// beyond wait on disk only and are read back (`refill`) as answers come in.
    handed: Cell<usize>,
    max_handed: usize,
    /// Log sequence number of the first record not yet handed to Kafka.
    next_unsent: Cell<u64>,
    next_replay_id: Cell<u64>,
    replayed: Cell<u64>,
    /// The last append failed (limit or disk full): logged once per episode.
    refusing: Cell<bool>,
}

/// Messages waiting for one peer shard beyond which this shard stops reading its sockets until
/// the peer catches up (the mesh channel itself holds `MESH_CHANNEL_BATCHES` batches).
const OUTBOX_MESSAGES_MAX: usize = 64 * 1024;

/// Bytes read from a socket per read call, into the core's scratch buffer.
const READ_CHUNK: usize = 16 * 1024;
const TICK: Duration = Duration::from_millis(100);
/// Memory freed by connections that had not completed CONNECT (a flood of them closing, say)
/// beyond which the ticker hands freed memory back to the operating system.
const RELEASE_MIN_BYTES: usize = 4 << 20;

/// The per-core state shared by this core's tasks.
pub(crate) struct Core {
    pub(crate) shard: RefCell<Shard>,
    /// Every read on this core lands here first: borrowed only while one socket is read, so one
    /// buffer serves every connection.
    pub(crate) scratch: RefCell<Vec<u8>>,
    pub(crate) conns: Conns,
    /// Batches being filled for each peer shard.
    outbox: RefCell<Vec<Vec<ShardMsg>>>,
    outbox_ready: Vec<Rc<Notify>>,
    /// Records for Kafka since the last hand-over, and the flag that wakes the task handing over.
    kafka_outbox: RefCell<Vec<ProduceRequest>>,
    kafka_ready: Notify,
    spill: Option<Spill>,
    positions_file: Option<std::path::PathBuf>,
    retained: RetainedStore,
    sessions: SessionStore,
    /// Wakes the session store's commit task.
    sessions_ready: Notify,
    /// Wakes the task that runs retained scans in turns ([`Shard::run_retained`]).
    retained_ready: Notify,
    wall_offset_ms: i64,
    epoch: Instant,
}

impl Core {
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether some peer is so far behind that reading more input would only grow memory.
    pub(crate) fn backlogged(&self) -> bool {
        self.outbox.borrow().iter().any(|b| b.len() > OUTBOX_MESSAGES_MAX) || self.shard.borrow().kafka_backlogged()
    }

    pub(crate) fn dispatch(&self) {
        let mut fx = self.shard.borrow_mut().drain_effects();
        for w in fx.warnings.drain(..) {
            tracing::warn!("{w}");
        }
        let mut refused = Vec::new();
        if !fx.produce.is_empty() {
            let mut spilled = Vec::new();
            if let Some(spill) = &self.spill {
                fx.produce.retain(|req| !req.durable || spill.append(req, &mut refused, &mut spilled));
            }
            if !spilled.is_empty() {
                // On disk only for now; they come back through `refill` under replay ids.
                self.shard.borrow_mut().on_spilled(&spilled);
            }
            if !fx.produce.is_empty() {
                self.kafka_outbox.borrow_mut().append(&mut fx.produce);
                self.kafka_ready.notify();
            }
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
    fn apply(&self, mut fx: sluice_core::shard::Effects) {
        for (topic, msg) in fx.retained.drain(..) {
            self.retained.record(&topic, msg.as_ref(), self.wall_offset_ms);
        }
        if fx.sessions_urgent {
            self.sessions_ready.notify();
        }
        if fx.retained_work {
            self.retained_ready.notify();
        }
        if fx.dirty.is_empty()
            && fx.close.is_empty()
            && fx.to_shards.is_empty()
            && fx.pause_reading.is_empty()
            && fx.resume_reading.is_empty()
        {
            return;
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
        let mut outbox = self.outbox.borrow_mut();
        for (to, msg) in fx.to_shards {
            outbox[to].push(msg);
            self.outbox_ready[to].notify();
        }
    }
}

impl Core {
    /// Stores the Kafka → MQTT positions if they moved (temp file + rename: never half-written).
    fn store_positions(&self) {
        let Some(path) = &self.positions_file else { return };
        let Some(p) = self.shard.borrow_mut().take_positions() else { return };
        let tmp = path.with_extension("tmp");
        let res = std::fs::create_dir_all(path.parent().unwrap())
            .and_then(|_| std::fs::write(&tmp, sluice_core::inbound::encode_positions(&p)))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), error = %e, "cannot store Kafka → MQTT positions");
        }
    }
}

impl Spill {
    /// Appends a durable record. Returns whether to hand it to Kafka now: false when it was
    /// refused (`refused`: the log is full) or left on disk behind a backlog (`spilled`).
    fn append(&self, req: &ProduceRequest, refused: &mut Vec<u64>, spilled: &mut Vec<u64>) -> bool {
        let cluster = self.clusters.get(usize::from(req.record.cluster)).map_or("", String::as_str);
        let mut buf = Vec::with_capacity(req.record.size() + 64);
        req.record.encode(cluster, &mut buf);
        let seq = match self.log.borrow_mut().append(&buf, req.record.timestamp_ms) {
            Ok(seq) => seq,
            Err(e) => {
                if !self.refusing.replace(true) {
                    tracing::warn!(error = %e, "spill log refuses records (QoS 1/2 publishers hear 0x97 or are not acknowledged) until space returns");
                }
                refused.push(req.id);
                return false;
            }
        };
        if self.refusing.replace(false) {
            tracing::warn!("spill log takes records again");
        }
        self.awaiting_sync.borrow_mut().push_back((req.id, seq));
        self.sync_ready.notify();
        // Straight to Kafka only when nothing older waits on disk (order) and there is room.
        if self.next_unsent.get() == seq && self.handed.get() < self.max_handed {
            self.next_unsent.set(seq + 1);
            self.handed.set(self.handed.get() + 1);
            self.seq_of.borrow_mut().insert(req.id, seq);
            true
        } else {
            spilled.push(req.id);
            false
        }
    }

    /// Nothing waits in the log or for its group commit.
    fn drained(&self) -> bool {
        self.log.borrow().unconfirmed() == 0 && self.awaiting_sync.borrow().is_empty()
    }

    /// Kafka answered `id`: its log entry is delivered (or refused for good) either way.
    fn confirm(&self, id: u64) {
        if let Some(seq) = self.seq_of.borrow_mut().remove(&id) {
            self.handed.set(self.handed.get().saturating_sub(1));
            if let Err(e) = self.log.borrow_mut().confirm(seq) {
                tracing::warn!(error = %e, "spill log: deleting a confirmed segment failed");
            }
        }
    }

    /// Reads records waiting on disk back into produce requests while Kafka has room for them.
    fn refill(&self) -> Vec<ProduceRequest> {
        let mut out = Vec::new();
        loop {
            let room = self.max_handed.saturating_sub(self.handed.get());
            let next = self.next_unsent.get();
            if room == 0 || next >= self.log.borrow().next_seq() {
                return out;
            }
            let records = self.log.borrow().read_from(next, room.min(4096));
            let Some(last) = records.last() else {
                // Everything from `next` on was confirmed meanwhile.
                self.next_unsent.set(self.log.borrow().next_seq());
                return out;
            };
            self.next_unsent.set(last.seq + 1);
            for r in records {
                let decoded = KafkaRecord::decode(&r.payload).ok().and_then(|(cluster, mut rec)| {
                    rec.cluster = self.clusters.iter().position(|c| *c == cluster)? as u16;
                    Some(rec)
                });
                let Some(record) = decoded else {
                    tracing::warn!(seq = r.seq, "spill log: record for an unknown cluster (config changed?); dropped");
                    let _ = self.log.borrow_mut().confirm(r.seq);
                    continue;
                };
                let id = REPLAY_ID | self.next_replay_id.get();
                self.next_replay_id.set(self.next_replay_id.get() + 1);
                self.seq_of.borrow_mut().insert(id, r.seq);
                self.handed.set(self.handed.get() + 1);
                self.replayed.set(self.replayed.get() + 1);
                out.push(ProduceRequest { id, record, durable: true });
            }
        }
    }
}

/// Group commit: one msync (on a blocking thread) for everything appended since the last, then
/// the publishers of those records get their acknowledgements.
async fn group_commit(core: Rc<Core>) {
    let spill = core.spill.as_ref().unwrap();
    loop {
        spill.sync_ready.notified().await;
        let job = spill.log.borrow_mut().sync_job();
        let durable_below = job.durable_below;
        let outcome = if job.is_empty() {
            Ok(())
        } else {
            match glommio::executor().spawn_blocking(move || job.run()).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::error!(error = %e, "spill log: msync failed; refusing the records it covered");
                    Err(ProduceError::SpillFull)
                }
            }
        };
        spill.log.borrow_mut().synced(durable_below);
        let mut ids = Vec::new();
        {
            let mut waiting = spill.awaiting_sync.borrow_mut();
            while waiting.front().is_some_and(|(_, seq)| *seq < durable_below) {
                ids.push(waiting.pop_front().unwrap().0);
            }
            if !waiting.is_empty() {
                spill.sync_ready.notify();
            }
        }
        let now = core.now_ms();
        core.shard.borrow_mut().on_durable(&ids, outcome, now);
        core.dispatch();
        // The delivery cursor, at most every 100 ms: a stale one only replays a few records.
        if spill.last_cursor_write.get().is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            spill.last_cursor_write.set(Some(Instant::now()));
            if let Err(e) = spill.log.borrow_mut().persist_cursor() {
                tracing::warn!(error = %e, "spill log: writing the cursor failed");
            }
        }
    }
}

/// Opens the spill log; what it holds unconfirmed is replayed through `Spill::refill`.
fn open_spill(
    dir: &std::path::Path,
    opts: sluice_storage::LogOptions,
    clusters: &[String],
    max_handed: usize,
    shard: usize,
) -> Result<Spill, String> {
    let (log, recovered) =
        sluice_storage::Log::open_lazy(dir, opts).map_err(|e| format!("shard {shard}: opening the spill log: {e}"))?;
    if let Some(t) = &recovered.truncation {
        tracing::warn!(shard, segment = %t.segment.display(), offset = t.offset, dropped_bytes = t.dropped_bytes,
            reason = %t.reason, "spill log: damaged record found; everything before it is kept");
    }
    let backlog = log.unconfirmed();
    if backlog > 0 {
        tracing::info!(shard, records = backlog, "spill log: replaying records not yet confirmed by Kafka");
    }
    Ok(Spill {
        log: RefCell::new(log),
        clusters: clusters.to_vec(),
        seq_of: RefCell::new(HashMap::default()),
        awaiting_sync: RefCell::new(VecDeque::new()),
        sync_ready: Notify::default(),
        last_cursor_write: Cell::new(None),
        handed: Cell::new(0),
        max_handed: max_handed.max(1),
        next_unsent: Cell::new(recovered.first_unconfirmed),
        next_replay_id: Cell::new(0),
        replayed: Cell::new(0),
        refusing: Cell::new(false),
    })
}

pub(crate) async fn run_shard(
    cfg: ShardConfig,
    mesh: MeshBuilder<Vec<ShardMsg>, Full>,
    shutdown: Arc<AtomicBool>,
    on_listening: impl Fn(SocketAddr, bool),
) -> Result<(), String> {
    let bind = |addr: SocketAddr, dedicated: bool| {
        let l = conns::listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        on_listening(l.local_addr().map_err(|e| e.to_string())?, dedicated);
        Ok::<_, String>(l)
    };
    let listener = bind(cfg.listen, false)?;
    let own_listener = cfg.own_listen.map(|a| bind(a, true)).transpose()?;
    let (senders, mut receivers) = mesh.join().await.map_err(|_| "cannot join the shard mesh".to_string())?;
    let now0 = cfg.epoch.elapsed().as_millis() as u64;
    let mut shard = Shard::new(cfg.id, cfg.n_shards, cfg.limits, now0).with_session_store();
    let wall_offset_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
            - cfg.epoch.elapsed().as_millis() as i64;
    shard.set_wall_offset(wall_offset_ms);
    let (retained, restored) = RetainedStore::open(&cfg.data_dir.join("retained").join(format!("shard-{}", cfg.id)))
        .map_err(|e| format!("shard {}: {e}", cfg.id))?;
    let mut adopted_dirs: Vec<std::path::PathBuf> = Vec::new();
    let mut kafka_link = None;
    let mut spill = None;
    let mut positions_file = None;
    if let Some(b) = cfg.bridge {
        let router = Router::new(&b.mappings, &b.clusters).map_err(|e| e.to_string())?;
        if let Some((dir, opts)) = &b.spill {
            spill = Some(open_spill(dir, *opts, &b.clusters, b.max_pending, cfg.id)?);
        }
        // The QoS 0 policy and outage spilling need the spill log.
        shard = shard.with_bridge(sluice_core::shard::BridgeOptions {
            router,
            delivery: b.delivery,
            max_pending_records: b.max_pending,
            qos0_policy: if spill.is_some() { b.qos0_when_backlogged } else { Default::default() },
            spill_on_timeout: spill.is_some() && b.spill_on_timeout,
        });
        let inbound = sluice_core::inbound::Inbound::new(&b.inbound, &b.clusters).map_err(|e| e.to_string())?;
        shard = shard.with_inbound(inbound, b.inbound.len(), b.inbound_max_wait_ms);
        positions_file = Some(b.positions_file.clone());
        kafka_link = Some((b.requests, b.results, b.inbound_rx));
    }
    let sessions = SessionStore::open(
        &cfg.data_dir.join("sessions").join(format!("shard-{}", cfg.id)),
        &mut shard,
        cfg.epoch.elapsed().as_millis() as u64,
    )
    .map_err(|e| format!("shard {}: {e}", cfg.id))?;
    let core = Rc::new(Core {
        shard: RefCell::new(shard),
        scratch: RefCell::new(vec![0; READ_CHUNK]),
        conns: Conns::new([Some(listener), own_listener].into_iter().flatten().collect())
            .map_err(|e| format!("shard {}: cannot watch its sockets: {e}", cfg.id))?,
        outbox: RefCell::new((0..cfg.n_shards).map(|_| Vec::new()).collect()),
        outbox_ready: (0..cfg.n_shards).map(|_| Rc::new(Notify::default())).collect(),
        kafka_outbox: RefCell::new(Vec::new()),
        kafka_ready: Notify::default(),
        spill,
        positions_file,
        retained,
        sessions,
        sessions_ready: Notify::default(),
        retained_ready: Notify::default(),
        wall_offset_ms,
        epoch: cfg.epoch,
    });
    // Retained messages from the last run (before any client can subscribe: the listener is
    // bound but nothing is accepted until the accept loop below).
    if !restored.is_empty() {
        let count = restored.len();
        let moved = core.shard.borrow_mut().restore_retained(restored, false, core.now_ms());
        core.retained.forget(&moved);
        tracing::info!(shard = cfg.id, count, "retained messages restored");
        core.dispatch();
    }
    // Restored sessions joined their shared groups on other shards.
    core.dispatch();
    // Stores of shards that no longer exist (the process runs with fewer cores now): shard 0
    // hands their messages to their new owners, lets the group commit make them durable there,
    // then removes the old store.
    if cfg.id == 0 {
        let orphans = crate::store::orphan_retained_dirs(&cfg.data_dir.join("retained"), cfg.n_shards);
        for dir in orphans {
            let (orphan, msgs) = RetainedStore::open(&dir)?;
            drop(orphan);
            let count = msgs.len();
            core.shard.borrow_mut().restore_retained(msgs, true, core.now_ms());
            core.dispatch();
            adopted_dirs.push(dir.clone());
            tracing::info!(from = %dir.display(), count, "retained messages adopted from a former shard");
        }
    }
    {
        let c = core.clone();
        glommio::spawn_local(async move {
            loop {
                c.sessions_ready.notified().await;
                c.sessions.commit(&c.shard, &c.retained, || c.now_ms()).await;
                c.dispatch();
            }
        })
        .detach();
    }
    // Retained lookups for new subscriptions: one bounded slice of scanning per turn, then the
    // core's connections and other tasks run before the next (a lookup over 100,000 retained
    // messages must not stall the shard).
    {
        let c = core.clone();
        glommio::spawn_local(async move {
            loop {
                c.retained_ready.notified().await;
                loop {
                    let now = c.now_ms();
                    let more = c.shard.borrow_mut().run_retained(now);
                    c.dispatch();
                    if !more {
                        break;
                    }
                    futures_lite::future::yield_now().await;
                }
            }
        })
        .detach();
    }
    if let Some(spill) = &core.spill {
        glommio::spawn_local(group_commit(core.clone())).detach();
        core.kafka_outbox.borrow_mut().extend(spill.refill());
        core.kafka_ready.notify();
    }

    // The Kafka link: one task hands batches of records over, one takes results back.
    if let Some((requests, mut results, mut inbound)) = kafka_link {
        let c = core.clone();
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
        let c = core.clone();
        glommio::spawn_local(async move {
            loop {
                c.kafka_ready.notified().await;
                let batch = std::mem::take(&mut *c.kafka_outbox.borrow_mut());
                if !batch.is_empty() && requests.send(batch).await.is_err() {
                    break;
                }
            }
        })
        .detach();
        let c = core.clone();
        glommio::spawn_local(async move {
            while let Some(mut batch) = results.recv().await {
                if let Some(spill) = &c.spill {
                    for r in &batch {
                        spill.confirm(r.id);
                    }
                    batch.retain(|r| r.id & REPLAY_ID == 0);
                    let more = spill.refill();
                    if !more.is_empty() {
                        c.kafka_outbox.borrow_mut().extend(more);
                        c.kafka_ready.notify();
                    }
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

    // Receivers: one task per peer, each batch handled in one call into the state machine.
    for (_peer, mut stream) in receivers.streams() {
        let core = core.clone();
        glommio::spawn_local(async move {
            while let Some(batch) = stream.next().await {
                let now = core.now_ms();
                core.shard.borrow_mut().on_shard_msgs(batch, now);
                core.dispatch();
            }
        })
        .detach();
    }

    // Senders: one task per peer, shipping whatever accumulated since its last send.
    let senders = Rc::new(senders);
    let mut sender_tasks = Vec::new();
    for peer in 0..cfg.n_shards {
        if peer == cfg.id {
            continue;
        }
        let core = core.clone();
        let senders: Rc<Senders<Vec<ShardMsg>>> = senders.clone();
        sender_tasks.push(glommio::spawn_local(async move {
            loop {
                core.outbox_ready[peer].notified().await;
                let batch = std::mem::take(&mut core.outbox.borrow_mut()[peer]);
                if batch.is_empty() {
                    continue;
                }
                if senders.send_to(peer, batch).await.is_err() {
                    break;
                }
            }
        }));
    }

    // Ticker: keep-alive, delayed wills, session expiry, $SYS; also watches for shutdown.
    // `SLUICE_FAILPOINT=shard-panic:N` makes shard N panic on its first tick (tests only).
    let panic_here = std::env::var("SLUICE_FAILPOINT").is_ok_and(|v| v == format!("shard-panic:{}", cfg.id));
    let stop_accept = Rc::new(Notify::default());
    {
        let core = core.clone();
        let stop_accept = stop_accept.clone();
        let sys = cfg.sys_interval_ms;
        let release_memory = cfg.release_memory;
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(TICK).await;
                if panic_here {
                    // Fault injection for the test of what a panicking shard does to the process.
                    panic!("SLUICE_FAILPOINT: shard {} panics", core.shard.borrow().id());
                }
                if shutdown.load(Ordering::Relaxed) {
                    stop_accept.notify();
                    break;
                }
                let now = core.now_ms();
                if let Some(spill) = &core.spill {
                    let log = spill.log.borrow();
                    let stats = (log.unconfirmed(), log.disk_bytes(), spill.replayed.get());
                    drop(log);
                    core.shard.borrow_mut().set_spill_stats(stats.0, stats.1, stats.2);
                }
                core.shard.borrow_mut().tick(now, sys);
                // Measured: without this, 60 MiB of partial CONNECTs freed stayed resident
                // (mimalloc purges freed pages only on later allocator work an idle shard lacks).
                if core.shard.borrow_mut().take_preconnect_released() >= RELEASE_MIN_BYTES {
                    release_memory();
                }
                core.store_positions();
                core.sessions_ready.notify();
                core.dispatch();
            }
        })
        .detach();
    }

    if !adopted_dirs.is_empty() {
        // Removed once the new owners' stores synced (their group commits run each tick; two
        // rounds of ours cover the messages shard 0 itself received).
        let c = core.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_secs(2)).await;
            c.retained.sync().await;
            for d in adopted_dirs {
                if let Err(e) = std::fs::remove_dir_all(&d) {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot remove an adopted retained store");
                }
            }
        })
        .detach();
    }

    // Every connection on this core, in one task (conns.rs); runs until shutdown below.
    let driver = glommio::spawn_local(conns::drive(core.clone()));
    stop_accept.notified().await;
    core.conns.stop_accepting();

    // Clean shutdown: every connection gets its last bytes (DISCONNECT 0x8B on MQTT 5), no wills.
    core.store_positions();
    core.retained.sync().await;
    let now = core.now_ms();
    core.shard.borrow_mut().shutdown(now);
    core.dispatch();
    core.sessions.commit(&core.shard, &core.retained, || core.now_ms()).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while core.conns.len() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    drop(driver);
    drop(sender_tasks);
    Ok(())
}
