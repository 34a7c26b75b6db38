//! What a shard keeps on disk besides the spill log: retained messages and persistent sessions,
//! each a [`KeyedLog`] (latest value per key) under `data_dir/{retained,sessions}/shard-N`.
//!
//! Both are written from this shard's thread only; their group commits (msync) run together on a
//! blocking thread, every tick and at once when an acknowledgement waits for them: the state
//! machine holds a persistent session's SUBACK, and the PUBACK of a message that was queued for a
//! persistent session or stored as retained on any shard, until [`Shard::on_sessions_synced`]
//! (receipts between shards carry the news).
//!
//! Sessions move between shards (a client reconnects elsewhere), so at start
//! [`prepare_sessions`] merges every shard's session store — the highest generation of a
//! session wins — and moves each session to the store of the shard owning its directory entry,
//! which restores it. That also adopts the stores of shards that no longer exist.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use sluice_core::shard::{directory_shard, Msg, SessionChange, Shard, StoredMessage};
use sluice_storage::{KeyedLog, LogOptions};

/// Live records moved per compaction step (one step per commit).
const COMPACT_BUDGET: usize = 256;

fn options() -> LogOptions {
    LogOptions { segment_bytes: 16 << 20, max_bytes: 64 << 30 }
}

fn shard_dirs(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut dirs: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let i = e.file_name().to_str()?.strip_prefix("shard-")?.parse().ok()?;
            Some((i, e.path()))
        })
        .collect();
    dirs.sort();
    dirs
}

fn open(dir: &Path, what: &str) -> Result<(KeyedLog, Vec<sluice_storage::Entry>), String> {
    let (log, entries, damage) = KeyedLog::open(dir, options()).map_err(|e| format!("opening the {what}: {e}"))?;
    if let Some(t) = damage {
        tracing::warn!(segment = %t.segment.display(), offset = t.offset, dropped_bytes = t.dropped_bytes,
            reason = %t.reason, "{what}: damaged record found; everything before it is kept");
    }
    Ok((log, entries))
}

/// One group commit of `log`, off the reactor.
async fn commit(log: &RefCell<KeyedLog>, what: &str) {
    let job = log.borrow_mut().sync_job();
    let Some(job) = job else { return };
    let below = job.durable_below;
    if let Err(e) = glommio::executor().spawn_blocking(move || job.run()).await {
        tracing::warn!(error = %e, "{what}: msync failed");
    }
    if let Err(e) = log.borrow_mut().synced(below) {
        tracing::warn!(error = %e, "{what}: writing the cursor failed");
    }
}

/// Merges the session stores of every shard directory under `root` into the stores of the
/// shards that will restore them (`n` shards from now on); removes the stores of shards that no
/// longer exist. Runs before the shards start.
pub(crate) fn prepare_sessions(root: &Path, n: usize) -> Result<(), String> {
    let mut dirs = shard_dirs(root);
    for i in 0..n {
        if !dirs.iter().any(|(d, _)| *d == i) {
            dirs.push((i, root.join(format!("shard-{i}"))));
        }
    }
    dirs.sort();
    let mut logs = Vec::with_capacity(dirs.len());
    let mut found = Vec::new();
    for (i, dir) in &dirs {
        let (log, entries) = open(dir, "session store")?;
        found.push((*i, entries));
        logs.push((*i, log));
    }
    let shards: Vec<usize> = dirs.iter().map(|(i, _)| *i).collect();
    let index = |shard: usize| shards.iter().position(|i| *i == shard).unwrap();
    // The newest copy of each session.
    let mut newest: std::collections::HashMap<Vec<u8>, (u64, usize)> = std::collections::HashMap::new();
    for (shard, entries) in &found {
        for e in entries {
            let best = newest.entry(e.key.clone()).or_insert((e.version, *shard));
            if e.version > best.0 {
                *best = (e.version, *shard);
            }
        }
    }
    // Copies go to their owners first and are made durable; only then are the old ones dropped.
    let mut drop_from: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut moved = 0usize;
    for (shard, entries) in found {
        for e in entries {
            let winner = newest[&e.key] == (e.version, shard);
            let owner = std::str::from_utf8(&e.key).map_or(shard, |id| directory_shard(id, n));
            if winner && owner != shard {
                let at = index(owner);
                logs[at].1.put(&e.key, e.version, &e.value).map_err(|err| format!("session store: {err}"))?;
                moved += 1;
            }
            if !winner || owner != shard {
                drop_from.push((shard, e.key));
            }
        }
    }
    for (_, log) in logs.iter_mut() {
        log.sync().map_err(|e| format!("session store: {e}"))?;
    }
    for (shard, key) in drop_from {
        let at = index(shard);
        logs[at].1.delete(&key).map_err(|e| format!("session store: {e}"))?;
    }
    for (_, log) in logs.iter_mut() {
        log.sync().map_err(|e| format!("session store: {e}"))?;
    }
    let total: usize = logs.iter().map(|(_, l)| l.len()).sum();
    for ((i, log), (_, dir)) in logs.into_iter().zip(&dirs) {
        if i >= n {
            debug_assert!(log.is_empty());
            drop(log);
            std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
            tracing::info!(from = %dir.display(), "session store of a former shard adopted");
        }
    }
    if total > 0 {
        tracing::info!(sessions = total, moved, "session stores merged");
    }
    Ok(())
}

/// This shard's persistent sessions on disk.
pub(crate) struct SessionStore {
    log: RefCell<KeyedLog>,
}

impl SessionStore {
    /// Opens the store (after [`prepare_sessions`]) and restores its sessions into `shard`.
    pub(crate) fn open(dir: &Path, shard: &mut Shard, now_ms: u64) -> Result<SessionStore, String> {
        let (mut log, entries) = open(dir, "session store")?;
        let count = entries.len();
        let stored =
            entries.into_iter().filter_map(|e| Some((String::from_utf8(e.key).ok()?, e.version, e.value))).collect();
        let dropped = shard.restore_sessions(stored, now_ms);
        for id in &dropped {
            if let Err(e) = log.delete(id.as_bytes()) {
                tracing::warn!(error = %e, "session store: cannot drop an expired session");
            }
        }
        if count > 0 {
            tracing::info!(
                shard = shard.id(),
                restored = count - dropped.len(),
                expired = dropped.len(),
                "persistent sessions restored"
            );
        }
        Ok(SessionStore { log: RefCell::new(log) })
    }

    /// Writes the session changes the state machine collected, commits them together with the
    /// retained store (a receipt may wait for either), and tells the state machine.
    pub(crate) async fn commit(&self, shard: &RefCell<Shard>, retained: &RetainedStore, now_ms: impl Fn() -> u64) {
        let (changes, token) = shard.borrow_mut().take_session_changes();
        {
            let mut log = self.log.borrow_mut();
            for c in changes {
                let res = match c {
                    SessionChange::Put { client_id, generation, bytes } => {
                        log.put(client_id.as_bytes(), generation, &bytes)
                    }
                    SessionChange::Delete { client_id } => log.delete(client_id.as_bytes()),
                };
                if let Err(e) = res {
                    // The session lives on in memory; only a crash before the next successful
                    // write of it would lose it.
                    tracing::warn!(error = %e, "session store: cannot persist a session");
                }
            }
            if let Err(e) = log.compact(COMPACT_BUDGET) {
                tracing::warn!(error = %e, "session store: compaction failed");
            }
        }
        retained.sync().await;
        commit(&self.log, "session store").await;
        shard.borrow_mut().on_sessions_synced(token, now_ms());
    }
}

/// This shard's retained messages on disk, by topic.
pub(crate) struct RetainedStore {
    log: RefCell<KeyedLog>,
}

impl RetainedStore {
    pub(crate) fn open(dir: &Path) -> Result<(RetainedStore, Vec<StoredMessage>), String> {
        let (log, entries) = open(dir, "retained store")?;
        let msgs = entries.iter().filter_map(|e| StoredMessage::decode(&e.value)).collect();
        Ok((RetainedStore { log: RefCell::new(log) }, msgs))
    }

    pub(crate) fn record(&self, topic: &str, msg: Option<&Msg>, wall_offset_ms: i64) {
        let mut log = self.log.borrow_mut();
        let res = match msg {
            Some(m) => {
                let mut buf = Vec::new();
                StoredMessage::from_message(m, wall_offset_ms).encode(&mut buf);
                log.put(topic.as_bytes(), 0, &buf)
            }
            None => log.delete(topic.as_bytes()),
        };
        if let Err(e) = res {
            tracing::warn!(%topic, error = %e, "retained store: cannot persist");
        }
    }

    /// Drops topics this store no longer owns (they went to their owner shard).
    pub(crate) fn forget(&self, topics: &[String]) {
        let mut log = self.log.borrow_mut();
        for t in topics {
            let _ = log.delete(t.as_bytes());
        }
    }

    /// Group commit (off the reactor) and a compaction step.
    pub(crate) async fn sync(&self) {
        if let Err(e) = self.log.borrow_mut().compact(COMPACT_BUDGET) {
            tracing::warn!(error = %e, "retained store: compaction failed");
        }
        commit(&self.log, "retained store").await;
    }
}

/// Retained stores of shards that no longer exist (index ≥ `n`).
pub(crate) fn orphan_retained_dirs(root: &Path, n: usize) -> Vec<PathBuf> {
    shard_dirs(root).into_iter().filter(|(i, _)| *i >= n).map(|(_, d)| d).collect()
}

/// Spill logs of shards that no longer exist (fewer cores than last run): their unconfirmed
/// records are appended to the spill log of shard `k % n` and made durable there before the old
/// log is removed, so that they are replayed to Kafka like the shard's own.
pub(crate) fn adopt_orphan_spills(root: &Path, n: usize, opts: LogOptions) -> Result<(), String> {
    for (k, dir) in shard_dirs(root).into_iter().filter(|(k, _)| *k >= n) {
        let (old, _) =
            sluice_storage::Log::open_lazy(&dir, opts).map_err(|e| format!("opening {}: {e}", dir.display()))?;
        let target = root.join(format!("shard-{}", k % n));
        let (mut new, _) =
            sluice_storage::Log::open_lazy(&target, opts).map_err(|e| format!("opening {}: {e}", target.display()))?;
        let mut next = 0;
        let mut moved = 0u64;
        loop {
            let batch = old.read_from(next, 1024);
            let Some(last) = batch.last() else { break };
            next = last.seq + 1;
            for r in &batch {
                new.append(&r.payload, r.timestamp_ms).map_err(|e| format!("spill log {}: {e}", target.display()))?;
            }
            moved += batch.len() as u64;
        }
        new.sync().map_err(|e| format!("spill log {}: {e}", target.display()))?;
        drop(old);
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
        tracing::info!(from = %dir.display(), to = %target.display(), records = moved,
            "spill log of a former shard adopted; its records are replayed from there");
    }
    Ok(())
}
