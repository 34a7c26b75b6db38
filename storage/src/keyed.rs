//! The latest value per key, on a [`Log`]: retained messages by topic, sessions by client id.
//!
//! Every change is one appended record; the record it supersedes is confirmed at once, so the
//! log's cursor and segment deletion follow the live set. A key that never changes would pin
//! its segment for ever, so [`KeyedLog::compact`] copies the live records of the oldest segment
//! forward (bounded work per call) once the log holds more than twice what is live.
//!
//! Record payload: `kind u8 (1 put, 0 delete) | version u64 | key_len u32 | key | value`.
//! The version is the caller's: when several logs hold the same key (a session that moved
//! between shards and a crash before the old shard's delete was synced), the highest wins.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::{Log, LogError, LogOptions, SyncJob, Truncation, HEADER_BYTES};

/// One live key as found when the log was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub version: u64,
    pub value: Vec<u8>,
}

#[derive(Clone, Copy, Debug)]
struct Live {
    seq: u64,
    version: u64,
    bytes: u64,
}

pub struct KeyedLog {
    log: Log,
    live: HashMap<Vec<u8>, Live>,
    live_bytes: u64,
    dirty: bool,
}

fn encode(kind: u8, version: u64, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(13 + key.len() + value.len());
    b.push(kind);
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&(key.len() as u32).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(value);
    b
}

/// `(kind, version, key, value)`; `None` for a record this module did not write.
fn decode(b: &[u8]) -> Option<(u8, u64, &[u8], &[u8])> {
    let kind = *b.first()?;
    let version = u64::from_le_bytes(b.get(1..9)?.try_into().ok()?);
    let n = u32::from_le_bytes(b.get(9..13)?.try_into().ok()?) as usize;
    let key = b.get(13..13 + n)?;
    Some((kind, version, key, &b[13 + n..]))
}

impl KeyedLog {
    /// Opens (or creates) the store in `dir`: the live entries in the order they were last
    /// written, and any damage recovery cut off.
    pub fn open(
        dir: impl Into<PathBuf>,
        opts: LogOptions,
    ) -> Result<(KeyedLog, Vec<Entry>, Option<Truncation>), LogError> {
        let (mut log, recovered) = Log::open(dir, opts)?;
        let mut latest: HashMap<Vec<u8>, (u64, u8, u64, Vec<u8>)> = HashMap::new();
        let mut stale = Vec::new();
        for r in recovered.records {
            let Some((kind, version, key, value)) = decode(&r.payload) else {
                stale.push(r.seq);
                continue;
            };
            if let Some((old, ..)) = latest.insert(key.to_vec(), (r.seq, kind, version, value.to_vec())) {
                stale.push(old);
            }
        }
        let mut live = HashMap::new();
        let mut live_bytes = 0;
        let mut entries = Vec::new();
        for (key, (seq, kind, version, value)) in latest {
            if kind == 1 {
                let bytes = HEADER_BYTES + 13 + key.len() as u64 + value.len() as u64;
                live_bytes += bytes;
                live.insert(key.clone(), Live { seq, version, bytes });
                entries.push((seq, Entry { key, version, value }));
            } else {
                stale.push(seq);
            }
        }
        // Superseded records and deletes were confirmed before, but only the cursor's prefix
        // was persisted.
        for seq in stale {
            log.confirm(seq)?;
        }
        entries.sort_by_key(|(seq, _)| *seq);
        let store = KeyedLog { log, live, live_bytes, dirty: true };
        Ok((store, entries.into_iter().map(|(_, e)| e).collect(), recovered.truncation))
    }

    pub fn put(&mut self, key: &[u8], version: u64, value: &[u8]) -> Result<(), LogError> {
        let seq = self.log.append(&encode(1, version, key, value), 0)?;
        let bytes = HEADER_BYTES + 13 + key.len() as u64 + value.len() as u64;
        self.live_bytes += bytes;
        if let Some(old) = self.live.insert(key.to_vec(), Live { seq, version, bytes }) {
            self.live_bytes -= old.bytes;
            self.log.confirm(old.seq)?;
        }
        self.dirty = true;
        Ok(())
    }

    /// Removes `key` (nothing to do if it is not live here).
    pub fn delete(&mut self, key: &[u8]) -> Result<(), LogError> {
        let Some(old) = self.live.get(key).copied() else { return Ok(()) };
        // The delete record must be on disk before the put it cancels may be dropped by the
        // cursor; it needs no life of its own after that, so it is confirmed with it.
        let seq = self.log.append(&encode(0, old.version, key, &[]), 0)?;
        self.live.remove(key);
        self.live_bytes -= old.bytes;
        self.log.confirm(old.seq)?;
        self.log.confirm(seq)?;
        self.dirty = true;
        Ok(())
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.live.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.log.disk_bytes()
    }

    /// Bytes the live records take (frames included).
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// The group commit for the changes since the last one, or `None` if there were none.
    pub fn sync_job(&mut self) -> Option<SyncJob> {
        if !std::mem::replace(&mut self.dirty, false) {
            return None;
        }
        Some(self.log.sync_job())
    }

    /// A sync job ran: its records are durable; the cursor follows.
    pub fn synced(&mut self, job_durable_below: u64) -> Result<(), LogError> {
        self.log.synced(job_durable_below);
        self.log.persist_cursor()
    }

    /// Synchronous group commit (start-up, tests).
    pub fn sync(&mut self) -> Result<(), LogError> {
        if let Some(job) = self.sync_job() {
            job.run().map_err(|source| LogError::Io { path: PathBuf::from("(msync)"), source })?;
            self.synced(job.durable_below)?;
        }
        Ok(())
    }

    /// Copies up to `budget` live records out of the oldest segment to the head of the log when
    /// the log holds more than twice what is live (plus two segments of slack), so that segment
    /// can go. Returns how many records moved.
    pub fn compact(&mut self, budget: usize) -> Result<usize, LogError> {
        let slack = 2 * self.log.opts.segment_bytes;
        if self.log.disk_bytes() <= 2 * self.live_bytes + slack {
            return Ok(0);
        }
        let Some(end) = self.log.first_segment_end() else { return Ok(0) };
        let mut pinned: Vec<(u64, Vec<u8>)> =
            self.live.iter().filter(|(_, l)| l.seq < end).map(|(k, l)| (l.seq, k.clone())).collect();
        pinned.sort_unstable();
        pinned.truncate(budget);
        let mut moved = 0;
        for (seq, key) in pinned {
            let Some(r) = self.log.read_from(seq, 1).into_iter().next().filter(|r| r.seq == seq) else { continue };
            let Some((1, version, _, value)) = decode(&r.payload) else { continue };
            let value = value.to_vec();
            self.put(&key, version, &value)?;
            moved += 1;
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> LogOptions {
        LogOptions { segment_bytes: 4096, max_bytes: 1 << 20 }
    }

    #[test]
    fn latest_value_per_key_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, entries, _) = KeyedLog::open(dir.path(), opts()).unwrap();
            assert!(entries.is_empty());
            s.put(b"a", 1, b"one").unwrap();
            s.put(b"b", 1, b"two").unwrap();
            s.put(b"a", 2, b"three").unwrap();
            s.put(b"c", 1, b"gone").unwrap();
            s.delete(b"c").unwrap();
            s.delete(b"nothing").unwrap();
            s.sync().unwrap();
        }
        let (s, entries, damage) = KeyedLog::open(dir.path(), opts()).unwrap();
        assert!(damage.is_none());
        let got: Vec<(&[u8], u64, &[u8])> =
            entries.iter().map(|e| (e.key.as_slice(), e.version, e.value.as_slice())).collect();
        assert_eq!(got, [(&b"b"[..], 1, &b"two"[..]), (&b"a"[..], 2, &b"three"[..])]);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn compaction_frees_segments_pinned_by_a_key_that_never_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _, _) = KeyedLog::open(dir.path(), opts()).unwrap();
        s.put(b"forever", 7, b"still here").unwrap();
        let value = [0u8; 200];
        for i in 0..2000u32 {
            s.put(b"hot", u64::from(i), &value).unwrap();
            s.compact(16).unwrap();
        }
        // Without compaction the first segment (holding "forever") would keep every later one.
        assert!(s.disk_bytes() <= 4 * 4096, "{} bytes on disk", s.disk_bytes());
        s.sync().unwrap();
        drop(s);
        let (_, entries, _) = KeyedLog::open(dir.path(), opts()).unwrap();
        let forever = entries.iter().find(|e| e.key == b"forever").unwrap();
        assert_eq!((forever.version, forever.value.as_slice()), (7, &b"still here"[..]));
        assert_eq!(entries.iter().find(|e| e.key == b"hot").unwrap().version, 1999);
    }
}
