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
//!
//! A store that cannot write (disk full, I/O error) never lets an acknowledgement through that
//! depends on it: a commit reports whether everything since the last one reached the disk, and
//! the state machine refuses the waiters of a failed one (MQTT 5 0x97, 3.1.1 no PUBACK, SUBACK
//! 0x80). What could not be written is written again at the next commit, so the store catches
//! up once space returns. Failures are logged once per episode.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_core::HashMap;

use sluice_core::shard::{directory_shard, Msg, SessionChange, Shard, StoredMessage};
use sluice_storage::{KeyedLog, LogError, LogOptions};

/// Why a store could not be opened, merged or adopted at start.
///
/// A [`LogError`] is part of the message, not the `source`: its `Io` form already prints its
/// own cause and also returns it as its source, so a chain would print that cause twice.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("opening the {what} in {}: {error}", dir.display())]
    Open { what: &'static str, dir: PathBuf, error: LogError },
    #[error("session store {}: merging the stores of every shard: {error}", dir.display())]
    Merge { dir: PathBuf, error: LogError },
    #[error("removing {}", dir.display())]
    Remove { dir: PathBuf, source: std::io::Error },
    #[error("spill log {}: msync failed", dir.display())]
    Sync { dir: PathBuf, source: std::io::Error },
    #[error("spill log {}: adopting the records of {}: {error}", into.display(), from.display())]
    AdoptSpill { from: PathBuf, into: PathBuf, error: LogError },
}

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

fn open(dir: &Path, what: &'static str) -> Result<(KeyedLog, Vec<sluice_storage::Entry>), StoreError> {
    let (log, entries, damage) =
        KeyedLog::open(dir, options()).map_err(|error| StoreError::Open { what, dir: dir.to_path_buf(), error })?;
    if let Some(t) = damage {
        tracing::warn!(segment = %t.segment.display(), offset = t.offset, dropped_bytes = t.dropped_bytes,
            reason = %t.reason, "{what}: damaged record found; everything before it is kept");
    }
    Ok((log, entries))
}

/// One group commit of `log`, off the reactor. Returns whether it reached the disk.
///
/// A cursor that cannot be written loses nothing (it only says which superseded records may
/// go; a stale one replays a few at the next start): logged once per episode of `cursor`.
async fn commit(log: &RefCell<KeyedLog>, what: &str, cursor: &Cell<bool>) -> bool {
    let job = log.borrow_mut().sync_job();
    let Some(job) = job else { return true };
    let below = job.durable_below;
    if let Err(e) = glommio::executor().spawn_blocking(move || job.run()).await {
        tracing::warn!(error = %e, "{what}: msync failed");
        return false;
    }
    match log.borrow_mut().synced(below) {
        Err(e) if !cursor.replace(true) => {
            tracing::warn!(error = %e, "{what}: writing the cursor failed (nothing is lost; retried every commit)")
        }
        Err(_) => {}
        Ok(()) if cursor.replace(false) => tracing::warn!("{what}: writing the cursor again"),
        Ok(()) => {}
    }
    true
}

/// While a store cannot write, how often it tries again. Each try may cost a segment's worth of
/// zeros written and removed again (a segment is preallocated), so not on every commit.
const RETRY_WHILE_FAILING: Duration = Duration::from_secs(1);

/// An episode of failed writes: logged when it starts and ends, not at every failure, and
/// writes are tried again at most every [`RETRY_WHILE_FAILING`] while it lasts.
#[derive(Default)]
struct Episode {
    failing: Cell<bool>,
    last_try: Cell<Option<Instant>>,
}

impl Episode {
    fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        self.last_try.set(Some(Instant::now()));
        if !self.failing.replace(true) {
            tracing::warn!(%error, "{what}: cannot write; acknowledgements that depend on it are refused (MQTT 5: 0x97) until it can");
        }
    }

    fn succeeded(&self, what: &str) {
        if self.failing.replace(false) {
            tracing::warn!("{what}: writing again; acknowledgements go out as before");
        }
    }

    /// Whether to attempt a write now.
    fn may_try(&self) -> bool {
        !self.failing.get() || self.last_try.get().is_none_or(|t| t.elapsed() >= RETRY_WHILE_FAILING)
    }
}

/// Merges the session stores of every shard directory under `root` into the stores of the
/// shards that will restore them (`n` shards from now on); removes the stores of shards that no
/// longer exist. Runs before the shards start.
pub(crate) fn prepare_sessions(root: &Path, n: usize) -> Result<(), StoreError> {
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
    let merge_err = |at: usize| {
        let dir = dirs[at].1.clone();
        move |error| StoreError::Merge { dir, error }
    };
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
                logs[at].1.put(&e.key, e.version, &e.value).map_err(merge_err(at))?;
                moved += 1;
            }
            if !winner || owner != shard {
                drop_from.push((shard, e.key));
            }
        }
    }
    for (at, (_, log)) in logs.iter_mut().enumerate() {
        log.sync().map_err(merge_err(at))?;
    }
    for (shard, key) in drop_from {
        let at = index(shard);
        logs[at].1.delete(&key).map_err(merge_err(at))?;
    }
    for (at, (_, log)) in logs.iter_mut().enumerate() {
        log.sync().map_err(merge_err(at))?;
    }
    let total: usize = logs.iter().map(|(_, l)| l.len()).sum();
    for ((i, log), (_, dir)) in logs.into_iter().zip(&dirs) {
        if i >= n {
            debug_assert!(log.is_empty());
            drop(log);
            std::fs::remove_dir_all(dir).map_err(|source| StoreError::Remove { dir: dir.clone(), source })?;
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
    episode: Episode,
    cursor_failing: Cell<bool>,
}

impl SessionStore {
    /// Opens the store (after [`prepare_sessions`]) and restores its sessions into `shard`.
    pub(crate) fn open(dir: &Path, shard: &mut Shard, now_ms: u64) -> Result<SessionStore, StoreError> {
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
        Ok(SessionStore { log: RefCell::new(log), episode: Episode::default(), cursor_failing: Cell::new(false) })
    }

    /// Writes the session changes the state machine collected, commits them together with the
    /// retained store (a receipt may wait for either), and tells the state machine.
    ///
    /// The commit is `ok` only if every session change and retained message since the last one
    /// was written and both logs reached the disk; otherwise its waiters are refused and what
    /// failed is retried next time.
    pub(crate) async fn commit(&self, shard: &RefCell<Shard>, retained: &RetainedStore, now_ms: impl Fn() -> u64) {
        retained.retry_failed();
        let (changes, token) = shard.borrow_mut().take_session_changes();
        // Retained writes that failed before this point belong to the waiters just taken.
        let mut ok = !retained.take_failed();
        let mut retry = Vec::new();
        {
            let mut log = self.log.borrow_mut();
            let mut attempt = self.episode.may_try();
            for c in changes {
                if !attempt {
                    // Failing: kept for the next try (and this commit refuses its waiters).
                    retry.push(match c {
                        SessionChange::Put { client_id, .. } | SessionChange::Delete { client_id } => client_id,
                    });
                    ok = false;
                    continue;
                }
                let (id, res) = match c {
                    SessionChange::Put { client_id, generation, bytes } => {
                        let res = log.put(client_id.as_bytes(), generation, &bytes);
                        (client_id, res)
                    }
                    SessionChange::Delete { client_id } => {
                        let res = log.delete(client_id.as_bytes());
                        (client_id, res)
                    }
                };
                if let Err(e) = res {
                    self.episode.failed("session store", &e);
                    retry.push(id);
                    ok = false;
                    attempt = false;
                }
            }
            if let Err(e) = log.compact(COMPACT_BUDGET) {
                tracing::warn!(error = %e, "session store: compaction failed");
            }
        }
        if !retry.is_empty() {
            shard.borrow_mut().retry_sessions(retry);
        }
        ok &= retained.sync().await;
        ok &= commit(&self.log, "session store", &self.cursor_failing).await;
        if ok {
            self.episode.succeeded("session store");
        }
        shard.borrow_mut().on_sessions_synced(token, ok, now_ms());
    }
}

/// This shard's retained messages on disk, by topic.
pub(crate) struct RetainedStore {
    log: RefCell<KeyedLog>,
    wall_offset_ms: Cell<i64>,
    /// A write failed since the last commit took the flag.
    failed: Cell<bool>,
    /// The latest value of each topic whose write failed, written again at the next commit (a
    /// later successful write of the topic supersedes it).
    retry: RefCell<HashMap<String, Option<Msg>>>,
    episode: Episode,
    cursor_failing: Cell<bool>,
}

impl RetainedStore {
    pub(crate) fn open(dir: &Path) -> Result<(RetainedStore, Vec<StoredMessage>), StoreError> {
        let (log, entries) = open(dir, "retained store")?;
        let msgs = entries.iter().filter_map(|e| StoredMessage::decode(&e.value)).collect();
        let store = RetainedStore {
            log: RefCell::new(log),
            wall_offset_ms: Cell::new(0),
            failed: Cell::new(false),
            retry: RefCell::new(HashMap::default()),
            episode: Episode::default(),
            cursor_failing: Cell::new(false),
        };
        Ok((store, msgs))
    }

    pub(crate) fn record(&self, topic: &str, msg: Option<&Msg>, wall_offset_ms: i64) {
        self.wall_offset_ms.set(wall_offset_ms);
        if !self.episode.may_try() {
            self.failed.set(true);
            self.retry.borrow_mut().insert(topic.to_string(), msg.cloned());
            return;
        }
        match self.write(topic, msg) {
            Ok(()) => {
                self.retry.borrow_mut().remove(topic);
            }
            Err(e) => {
                self.episode.failed("retained store", &e);
                self.failed.set(true);
                // A message too large for a segment never fits: refused, not retried forever.
                if !matches!(e, sluice_storage::LogError::RecordTooLarge { .. }) {
                    self.retry.borrow_mut().insert(topic.to_string(), msg.cloned());
                }
            }
        }
    }

    fn write(&self, topic: &str, msg: Option<&Msg>) -> Result<(), sluice_storage::LogError> {
        let mut log = self.log.borrow_mut();
        match msg {
            Some(m) => {
                let mut buf = Vec::new();
                StoredMessage::from_message(m, self.wall_offset_ms.get()).encode(&mut buf);
                log.put(topic.as_bytes(), 0, &buf)
            }
            None => log.delete(topic.as_bytes()),
        }
    }

    /// Writes again what failed before (space may have returned).
    fn retry_failed(&self) {
        if self.retry.borrow().is_empty() {
            return;
        }
        if !self.episode.may_try() {
            self.failed.set(true);
            return;
        }
        let pending: Vec<(String, Option<Msg>)> = self.retry.borrow_mut().drain().collect();
        for (topic, msg) in pending {
            // After a failure `record` keeps the rest for later without trying them.
            self.record(&topic, msg.as_ref(), self.wall_offset_ms.get());
        }
    }

    /// Whether a write failed since the last call.
    fn take_failed(&self) -> bool {
        self.failed.replace(false)
    }

    /// Drops topics this store no longer owns (they went to their owner shard).
    pub(crate) fn forget(&self, topics: &[String]) {
        let mut log = self.log.borrow_mut();
        for t in topics {
            let _ = log.delete(t.as_bytes());
        }
    }

    /// Group commit (off the reactor) and a compaction step; whether it reached the disk.
    pub(crate) async fn sync(&self) -> bool {
        if let Err(e) = self.log.borrow_mut().compact(COMPACT_BUDGET) {
            tracing::warn!(error = %e, "retained store: compaction failed");
        }
        let ok = commit(&self.log, "retained store", &self.cursor_failing).await;
        if ok && self.retry.borrow().is_empty() {
            self.episode.succeeded("retained store");
        }
        ok
    }
}

/// Retained stores of shards that no longer exist (index ≥ `n`).
pub(crate) fn orphan_retained_dirs(root: &Path, n: usize) -> Vec<PathBuf> {
    shard_dirs(root).into_iter().filter(|(i, _)| *i >= n).map(|(_, d)| d).collect()
}

/// Spill logs of shards that no longer exist (fewer cores than last run): their unconfirmed
/// records are appended to the spill log of shard `k % n` and made durable there before the old
/// log is removed, so that they are replayed to Kafka like the shard's own.
pub(crate) fn adopt_orphan_spills(root: &Path, n: usize, opts: LogOptions) -> Result<(), StoreError> {
    for (k, dir) in shard_dirs(root).into_iter().filter(|(k, _)| *k >= n) {
        let target = root.join(format!("shard-{}", k % n));
        let adopt_err = |error| StoreError::AdoptSpill { from: dir.clone(), into: target.clone(), error };
        let (old, _) = sluice_storage::Log::open_lazy(&dir, opts).map_err(|error| StoreError::Open {
            what: "spill log",
            dir: dir.clone(),
            error,
        })?;
        let (mut new, _) = sluice_storage::Log::open_lazy(&target, opts).map_err(|error| StoreError::Open {
            what: "spill log",
            dir: target.clone(),
            error,
        })?;
        let mut next = 0;
        let mut moved = 0u64;
        loop {
            let batch = old.read_from(next, 1024);
            let Some(last) = batch.last() else { break };
            next = last.seq + 1;
            for r in &batch {
                new.append(&r.payload, r.timestamp_ms).map_err(adopt_err)?;
            }
            moved += batch.len() as u64;
        }
        new.sync().map_err(|source| StoreError::Sync { dir: target.clone(), source })?;
        drop(old);
        std::fs::remove_dir_all(&dir).map_err(|source| StoreError::Remove { dir: dir.clone(), source })?;
        tracing::info!(from = %dir.display(), to = %target.display(), records = moved,
            "spill log of a former shard adopted; its records are replayed from there");
    }
    Ok(())
}
