//! A shard's spill log scheduling: which durable records go to Kafka now and which wait on
//! disk, the group commit that makes appends durable, and reading waiting records back.
//!
//! The log itself (segments, framing, recovery) is `sluice-storage`'s; this module decides when
//! to append, hand over, confirm and read back. Invariants:
//! - per-topic order: a record goes straight to Kafka only when nothing older waits on disk
//!   (`next_unsent` is the sequence number of the first record not handed over yet);
//! - at most `max_handed` durable records are with Kafka at once; the rest wait on disk only, so
//!   an outage costs disk (bounded by the log's `max_bytes`), not memory;
//! - a record's publisher is acknowledged only after the group commit that covers it
//!   ([`Spill::commit`] reports which ids it covered);
//! - records read back carry ids with [`REPLAY_ID`] set, outside the state machine's id space:
//!   their results confirm the log and go no further.
//!
//! It knows nothing of connections, the mesh or the state machine's internals: its callers hand
//! it produce requests and Kafka's answers and pass what it returns on to the state machine.

use sluice_core::HashMap;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_core::bridge::{KafkaRecord, ProduceError, ProduceRequest};
use sluice_storage::{LogError, LogOptions};

use crate::notify::Notify;

/// Ids of records replayed from the spill log: outside the state machine's id space, so their
/// results confirm the log and go no further.
pub(crate) const REPLAY_ID: u64 = 1 << 63;

/// How often, at most, the delivery cursor is written: a stale one only replays a few records.
const CURSOR_INTERVAL: Duration = Duration::from_millis(100);

/// Why the spill log could not be opened. The [`LogError`] is part of the message, not the
/// `source`: its `Io` form prints its own cause and returns it as source too (see `StoreError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpillError {
    #[error("opening the spill log in {}: {error}", dir.display())]
    Open { dir: PathBuf, error: LogError },
}

/// This shard's spill log (local-durable delivery, kafka-ack outages) and what it is waiting for.
pub(crate) struct Spill {
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

impl Spill {
    /// Opens the spill log in `dir`; what it holds unconfirmed is replayed through
    /// [`Spill::refill`].
    pub(crate) fn open(
        dir: &Path,
        opts: LogOptions,
        clusters: &[String],
        max_handed: usize,
        shard: usize,
    ) -> Result<Spill, SpillError> {
        let (log, recovered) = sluice_storage::Log::open_lazy(dir, opts)
            .map_err(|error| SpillError::Open { dir: dir.to_path_buf(), error })?;
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

    /// Appends a durable record. Returns whether to hand it to Kafka now: false when it was
    /// refused (`refused`: the log is full) or left on disk behind a backlog (`spilled`).
    ///
    /// This is a delivery decision (Kafka now or disk first) that sits here, in net, because it
    /// depends on the log's state (`next_unsent`, `handed`).
    pub(crate) fn append(&self, req: &ProduceRequest, refused: &mut Vec<u64>, spilled: &mut Vec<u64>) -> bool {
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
    pub(crate) fn drained(&self) -> bool {
        self.log.borrow().unconfirmed() == 0 && self.awaiting_sync.borrow().is_empty()
    }

    /// Kafka answered `id`: its log entry is delivered (or refused for good) either way.
    pub(crate) fn confirm(&self, id: u64) {
        if let Some(seq) = self.seq_of.borrow_mut().remove(&id) {
            self.handed.set(self.handed.get().saturating_sub(1));
            if let Err(e) = self.log.borrow_mut().confirm(seq) {
                tracing::warn!(error = %e, "spill log: deleting a confirmed segment failed");
            }
        }
    }

    /// Reads records waiting on disk back into produce requests while Kafka has room for them.
    pub(crate) fn refill(&self) -> Vec<ProduceRequest> {
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

    /// (records not confirmed yet, bytes on disk, records replayed) for `$SYS`.
    pub(crate) fn stats(&self) -> (u64, u64, u64) {
        let log = self.log.borrow();
        (log.unconfirmed(), log.disk_bytes(), self.replayed.get())
    }

    /// One group commit, once something was appended since the last: one msync (on a blocking
    /// thread) for everything appended since. Returns the ids of the records it covered, in
    /// order, and whether it reached the disk; their publishers get their acknowledgements.
    pub(crate) async fn commit(&self) -> (Vec<u64>, Result<(), ProduceError>) {
        self.sync_ready.notified().await;
        let job = self.log.borrow_mut().sync_job();
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
        self.log.borrow_mut().synced(durable_below);
        let mut ids = Vec::new();
        let mut waiting = self.awaiting_sync.borrow_mut();
        while let Some(&(id, seq)) = waiting.front() {
            if seq >= durable_below {
                break;
            }
            waiting.pop_front();
            ids.push(id);
        }
        if !waiting.is_empty() {
            self.sync_ready.notify();
        }
        (ids, outcome)
    }

    /// Writes the delivery cursor, at most every [`CURSOR_INTERVAL`].
    pub(crate) fn persist_cursor(&self) {
        if self.last_cursor_write.get().is_none_or(|t| t.elapsed() >= CURSOR_INTERVAL) {
            self.last_cursor_write.set(Some(Instant::now()));
            if let Err(e) = self.log.borrow_mut().persist_cursor() {
                tracing::warn!(error = %e, "spill log: writing the cursor failed");
            }
        }
    }
}
