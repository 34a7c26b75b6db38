//! sluice-storage: one shard's append-only log on disk.
//!
//! The log is a series of fixed-size segment files, preallocated and mapped with memmap2, named
//! by the sequence number of their first record (`00000000000000000042.seg`). It stores opaque
//! records — it knows nothing of MQTT or Kafka — and is the one crate where `unsafe` lives: the
//! crate denies it, and only the two functions that copy into and out of the mapping
//! (`Segment::bytes`, `Segment::write_at`) allow it.
//!
//! Record frame, little-endian: `len u32 | crc32c u32 | seq u64 | timestamp_ms i64 | payload`.
//! The CRC covers `seq`, `timestamp_ms` and the payload.
//!
//! Invariants:
//! - Sequence numbers are dense and increasing across segments; a segment's first record has
//!   its file's base sequence number.
//! - Bytes past the last record of a segment are zero, so a scan stops at `len == 0`.
//! - Everything below the persisted cursor is confirmed (delivered); a segment is deleted once
//!   every record in it is below the cursor.
//! - Recovery stops at the first torn or corrupt record, zeroes the segment from there, deletes
//!   later segments and reports how much it dropped; it never returns a record whose CRC fails.
//! - A record counts as durable only after [`SyncJob::run`] (msync) covered it: group commit,
//!   one msync per batch, which callers run off their event loop.
#![deny(unsafe_code)]
#![warn(rust_2018_idioms, unreachable_pub)]

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

pub mod keyed;
pub use keyed::{Entry, KeyedLog};

/// Frame header bytes before the payload.
pub const HEADER_BYTES: u64 = 24;

#[derive(Clone, Copy, Debug)]
pub struct LogOptions {
    /// Size of each segment file (preallocated).
    pub segment_bytes: u64,
    /// Most bytes of segment files the log may hold; appends fail with [`LogError::Full`] beyond.
    pub max_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { segment_bytes: 64 << 20, max_bytes: 4 << 30 }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("spill log full: {used_bytes} of {max_bytes} bytes hold unconfirmed records")]
    Full { used_bytes: u64, max_bytes: u64 },
    #[error("record of {size} bytes does not fit a {segment_bytes}-byte segment")]
    RecordTooLarge { size: u64, segment_bytes: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl LogError {
    /// Whether the disk (or the configured limit) is what stopped the append: the caller should
    /// refuse new records and retry once records are confirmed.
    pub fn is_full(&self) -> bool {
        match self {
            LogError::Full { .. } => true,
            LogError::Io { source, .. } => {
                source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(28 /* ENOSPC */)
            }
            LogError::RecordTooLarge { .. } => false,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

/// A record read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub timestamp_ms: i64,
    pub payload: Vec<u8>,
}

/// What recovery found damaged and dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub segment: PathBuf,
    /// Offset in the segment where the first bad record starts.
    pub offset: u64,
    /// Bytes after that offset that held something other than zeros, plus whole later segments.
    pub dropped_bytes: u64,
    pub reason: String,
}

/// What [`Log::open`] found: the unconfirmed records, in order, to replay; and any damage.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Empty from [`Log::open_lazy`], which leaves them on disk for [`Log::read_from`].
    pub records: Vec<Record>,
    pub truncation: Option<Truncation>,
    /// Sequence number of the first unconfirmed record (replay starts here).
    pub first_unconfirmed: u64,
}

struct Segment {
    base_seq: u64,
    path: PathBuf,
    map: Arc<MmapRaw>,
    len: u64,
    write_pos: u64,
    synced_pos: u64,
    /// Sequence number of its last record, if any.
    last_seq: Option<u64>,
    /// A known record boundary `(seq, offset)`, so sequential reads do not rescan the segment.
    read_hint: std::cell::Cell<(u64, u64)>,
}

impl Segment {
    #[allow(unsafe_code)]
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long and lives as long as `self.map`; this process
        // only writes below `write_pos` through `write_at`, never concurrently with this borrow
        // (both need `&self`/`&mut self` of the owning `Log`); msync on another thread reads only.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.len as usize) }
    }

    #[allow(unsafe_code)]
    fn write_at(&mut self, offset: u64, data: &[u8]) {
        assert!(offset + data.len() as u64 <= self.len, "write past the end of the segment");
        // SAFETY: bounds checked above; the mapping is writable (opened read-write) and no
        // reference into the written range is alive (`bytes()` borrows end before `&mut self`).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(offset as usize), data.len()) }
    }
}

/// One shard's log. Owned by one thread; only [`SyncJob`]s travel to others.
pub struct Log {
    dir: PathBuf,
    opts: LogOptions,
    segments: VecDeque<Segment>,
    next_seq: u64,
    /// Every record below this is confirmed; persisted in `cursor`.
    confirmed_below: u64,
    confirmed_above: BTreeSet<u64>,
    persisted_cursor: u64,
    /// Highest sequence number made durable by a completed sync, plus one.
    durable_below: u64,
}

/// The msync work of one group commit: run it on a blocking thread, then hand the result to
/// [`Log::synced`].
pub struct SyncJob {
    ranges: Vec<(Arc<MmapRaw>, usize, usize)>,
    /// Records below this are durable once the job ran.
    pub durable_below: u64,
}

impl SyncJob {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// msync of every range written since the last group commit.
    pub fn run(&self) -> io::Result<()> {
        for (map, offset, len) in &self.ranges {
            map.flush_range(*offset, *len)?;
        }
        Ok(())
    }
}

fn segment_name(base: u64) -> String {
    format!("{base:020}.seg")
}

fn frame_crc(seq: u64, ts: i64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&seq.to_le_bytes());
    head[8..].copy_from_slice(&ts.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering what is there and returning the
    /// unconfirmed records.
    pub fn open(dir: impl Into<PathBuf>, opts: LogOptions) -> Result<(Log, Recovered), LogError> {
        Self::open_inner(dir.into(), opts, true)
    }

    /// Like [`Log::open`], but validates without collecting: a big backlog stays on disk and is
    /// read with [`Log::read_from`] as it is replayed.
    pub fn open_lazy(dir: impl Into<PathBuf>, opts: LogOptions) -> Result<(Log, Recovered), LogError> {
        Self::open_inner(dir.into(), opts, false)
    }

    fn open_inner(dir: PathBuf, opts: LogOptions, collect: bool) -> Result<(Log, Recovered), LogError> {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let confirmed_below = read_cursor(&dir)?;
        let mut bases: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        bases.sort_unstable();
        let mut log = Log {
            dir,
            opts,
            segments: VecDeque::new(),
            next_seq: confirmed_below,
            confirmed_below,
            confirmed_above: BTreeSet::new(),
            persisted_cursor: confirmed_below,
            durable_below: confirmed_below,
        };
        let mut recovered = Recovered::default();
        let mut expected: Option<u64> = None;
        let mut damaged = false;
        for base in bases {
            let path = log.dir.join(segment_name(base));
            if damaged {
                // Everything after the first damage is dropped: order could not be trusted.
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if let Some(t) = recovered.truncation.as_mut() {
                    t.dropped_bytes += len;
                }
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let mut seg = map_segment(&path, base)?;
            if expected.is_some_and(|e| e != base) {
                damaged = true;
                let t = Truncation {
                    segment: path.clone(),
                    offset: 0,
                    dropped_bytes: seg.len,
                    reason: format!("segment starts at record {base}, expected {}", expected.unwrap()),
                };
                recovered.truncation = Some(t);
                drop(seg);
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let keep_from = if collect { confirmed_below } else { u64::MAX };
            let (end, last, damage) = scan(&seg, base, keep_from, &mut recovered.records);
            seg.write_pos = end;
            seg.synced_pos = end;
            seg.last_seq = last;
            if let Some(reason) = damage {
                damaged = true;
                let garbage = seg.bytes()[end as usize..].iter().filter(|b| **b != 0).count() as u64;
                let zeros = vec![0u8; (seg.len - end) as usize];
                seg.write_at(end, &zeros);
                seg.map.flush().map_err(io_err(&path))?;
                recovered.truncation =
                    Some(Truncation { segment: path.clone(), offset: end, dropped_bytes: garbage, reason });
            }
            expected = Some(last.map_or(base, |l| l + 1));
            log.next_seq = log.next_seq.max(expected.unwrap());
            log.segments.push_back(seg);
        }
        log.durable_below = log.next_seq;
        log.confirmed_below = log.confirmed_below.min(log.next_seq);
        // Records below the first surviving segment are gone (deleted once confirmed).
        if let Some(first) = log.segments.front() {
            log.confirmed_below = log.confirmed_below.max(first.base_seq);
        }
        recovered.first_unconfirmed = log.confirmed_below;
        log.drop_confirmed_segments()?;
        Ok((log, recovered))
    }

    /// Appends one record; returns its sequence number. Not durable until a sync covered it.
    pub fn append(&mut self, payload: &[u8], timestamp_ms: i64) -> Result<u64, LogError> {
        let size = HEADER_BYTES + payload.len() as u64;
        if size > self.opts.segment_bytes {
            return Err(LogError::RecordTooLarge { size, segment_bytes: self.opts.segment_bytes });
        }
        let fits = self.segments.back().is_some_and(|s| s.write_pos + size <= s.len);
        if !fits {
            self.roll()?;
        }
        let seq = self.next_seq;
        let seg = self.segments.back_mut().unwrap();
        let mut head = [0u8; HEADER_BYTES as usize];
        head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        head[4..8].copy_from_slice(&frame_crc(seq, timestamp_ms, payload).to_le_bytes());
        head[8..16].copy_from_slice(&seq.to_le_bytes());
        head[16..24].copy_from_slice(&timestamp_ms.to_le_bytes());
        let at = seg.write_pos;
        // Payload first, then the header: a crash in between leaves len == 0 or a CRC mismatch.
        seg.write_at(at + HEADER_BYTES, payload);
        seg.write_at(at, &head);
        seg.write_pos += size;
        seg.last_seq = Some(seq);
        self.next_seq += 1;
        Ok(seq)
    }

    fn roll(&mut self) -> Result<(), LogError> {
        self.drop_confirmed_segments()?;
        let used = self.segments.len() as u64 * self.opts.segment_bytes;
        if used + self.opts.segment_bytes > self.opts.max_bytes {
            return Err(LogError::Full { used_bytes: used, max_bytes: self.opts.max_bytes });
        }
        let path = self.dir.join(segment_name(self.next_seq));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_err(&path))?;
        if let Err(e) = preallocate(&file, self.opts.segment_bytes) {
            let _ = std::fs::remove_file(&path);
            return Err(LogError::Io { path, source: e });
        }
        drop(file);
        let seg = map_segment(&path, self.next_seq)?;
        self.segments.push_back(seg);
        Ok(())
    }

    /// The group commit for everything appended since the last one.
    pub fn sync_job(&mut self) -> SyncJob {
        let mut ranges = Vec::new();
        for s in self.segments.iter_mut() {
            if s.write_pos > s.synced_pos {
                ranges.push((s.map.clone(), s.synced_pos as usize, (s.write_pos - s.synced_pos) as usize));
                s.synced_pos = s.write_pos;
            }
        }
        SyncJob { ranges, durable_below: self.next_seq }
    }

    /// A sync job completed: its records are durable.
    pub fn synced(&mut self, job_durable_below: u64) {
        self.durable_below = self.durable_below.max(job_durable_below);
    }

    /// Synchronous group commit (tests, shutdown).
    pub fn sync(&mut self) -> io::Result<()> {
        let job = self.sync_job();
        job.run()?;
        self.synced(job.durable_below);
        Ok(())
    }

    /// Every record below this sequence number is durable.
    pub fn durable_below(&self) -> u64 {
        self.durable_below
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records appended and not yet confirmed.
    pub fn unconfirmed(&self) -> u64 {
        self.next_seq - self.confirmed_below - self.confirmed_above.len() as u64
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.len() as u64 * self.opts.segment_bytes
    }

    /// Sequence number just past the oldest segment's records, when there is a newer segment
    /// (the oldest is the one a compaction would free).
    pub fn first_segment_end(&self) -> Option<u64> {
        if self.segments.len() < 2 {
            return None;
        }
        Some(self.segments[1].base_seq)
    }

    /// Marks one record delivered. Confirmations may arrive in any order; the cursor moves over
    /// the contiguous prefix, and fully confirmed segments are deleted.
    pub fn confirm(&mut self, seq: u64) -> Result<(), LogError> {
        if seq < self.confirmed_below || seq >= self.next_seq {
            return Ok(());
        }
        self.confirmed_above.insert(seq);
        while self.confirmed_above.remove(&self.confirmed_below) {
            self.confirmed_below += 1;
        }
        self.drop_confirmed_segments()
    }

    /// Writes the cursor if it moved (atomically: temp file, fsync, rename). Call it with the
    /// group commit; a stale cursor only means replaying a few confirmed records after a crash.
    pub fn persist_cursor(&mut self) -> Result<(), LogError> {
        if self.persisted_cursor == self.confirmed_below {
            return Ok(());
        }
        let tmp = self.dir.join("cursor.tmp");
        let mut bytes = self.confirmed_below.to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
        std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
        let dst = self.dir.join("cursor");
        std::fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
        self.persisted_cursor = self.confirmed_below;
        Ok(())
    }

    fn drop_confirmed_segments(&mut self) -> Result<(), LogError> {
        // Keep the newest segment: appends continue there.
        while self.segments.len() > 1 {
            let s = &self.segments[0];
            let done = s.last_seq.is_none_or(|l| l < self.confirmed_below);
            if !done {
                break;
            }
            let s = self.segments.pop_front().unwrap();
            let path = s.path.clone();
            drop(s);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// The unconfirmed records from `from` on, in order (replay after an outage).
    ///
    /// Each record's CRC is checked again on the way out; a record that no longer matches stops
    /// the read there (it was valid when written or recovered, so this means the disk changed).
    pub fn read_from(&self, from: u64, max: usize) -> Vec<Record> {
        let mut out = Vec::new();
        let from = from.max(self.confirmed_below);
        for s in &self.segments {
            if s.last_seq.is_none_or(|l| l < from) {
                continue;
            }
            let bytes = s.bytes();
            let (mut seq, mut pos) = match s.read_hint.get() {
                (hs, ho) if hs <= from && hs >= s.base_seq => (hs, ho as usize),
                _ => (s.base_seq, 0),
            };
            while (pos as u64) < s.write_pos {
                let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
                let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap());
                let ts = i64::from_le_bytes(bytes[pos + 16..pos + 24].try_into().unwrap());
                let start = pos + HEADER_BYTES as usize;
                let payload = &bytes[start..start + len];
                if seq >= from && !self.confirmed_above.contains(&seq) {
                    if frame_crc(seq, ts, payload) != crc {
                        return out;
                    }
                    out.push(Record { seq, timestamp_ms: ts, payload: payload.to_vec() });
                }
                pos = start + len;
                seq += 1;
                if out.len() >= max {
                    s.read_hint.set((seq, pos as u64));
                    return out;
                }
            }
            s.read_hint.set((seq, pos as u64));
        }
        out
    }
}

fn preallocate(file: &File, len: u64) -> io::Result<()> {
    // set_len makes a sparse file; writing the last byte of each 4 KiB page would be slower than
    // the kernel's own zero pages. posix_fallocate would reserve blocks; std has no binding, so a
    // full disk shows up on the first write into a hole (SIGBUS) — avoided by reserving up front
    // with a zero-filled write in 1 MiB steps.
    use std::io::{Seek, SeekFrom, Write};
    let mut f = file;
    let zeros = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(0))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

fn map_segment(path: &Path, base: u64) -> Result<Segment, LogError> {
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let map = MmapOptions::new().len(len.max(1) as usize).map_raw(&file).map_err(io_err(path))?;
    Ok(Segment {
        base_seq: base,
        path: path.to_path_buf(),
        map: Arc::new(map),
        len,
        write_pos: 0,
        synced_pos: 0,
        last_seq: None,
        read_hint: std::cell::Cell::new((base, 0)),
    })
}

/// Scans a segment from its start. Pushes records with `seq >= keep_from` to `out`; returns
/// the end of valid data, the last valid sequence number and, if a bad record stopped the scan,
/// why.
fn scan(seg: &Segment, base: u64, keep_from: u64, out: &mut Vec<Record>) -> (u64, Option<u64>, Option<String>) {
    let bytes = seg.bytes();
    let mut pos = 0usize;
    let mut expect = base;
    let mut last = None;
    loop {
        if pos + HEADER_BYTES as usize > bytes.len() {
            // Too short for a header: the end, unless what is left is not zeros.
            let damaged = bytes[pos..].iter().any(|b| *b != 0);
            return (pos as u64, last, damaged.then(|| "torn record header at the end of the segment".into()));
        }
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap());
        if len == 0 && crc == 0 {
            let rest_zero = bytes[pos..].iter().all(|b| *b == 0);
            return (pos as u64, last, (!rest_zero).then(|| "bytes after the end of the records".into()));
        }
        let seq = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().unwrap());
        let ts = i64::from_le_bytes(bytes[pos + 16..pos + 24].try_into().unwrap());
        let start = pos + HEADER_BYTES as usize;
        if start + len > bytes.len() {
            return (pos as u64, last, Some(format!("record {expect} runs past the end of the segment")));
        }
        let payload = &bytes[start..start + len];
        if frame_crc(seq, ts, payload) != crc {
            return (pos as u64, last, Some(format!("record {expect}: CRC mismatch (torn or corrupt)")));
        }
        if seq != expect {
            return (pos as u64, last, Some(format!("record numbered {seq} where {expect} was expected")));
        }
        if seq >= keep_from {
            out.push(Record { seq, timestamp_ms: ts, payload: payload.to_vec() });
        }
        last = Some(seq);
        expect += 1;
        pos = start + len;
    }
}

fn read_cursor(dir: &Path) -> Result<u64, LogError> {
    let path = dir.join("cursor");
    match std::fs::read(&path) {
        Ok(b) if b.len() == 12 => {
            let v = u64::from_le_bytes(b[..8].try_into().unwrap());
            let crc = u32::from_le_bytes(b[8..].try_into().unwrap());
            // A corrupt cursor replays from the start: duplicates, never loss.
            Ok(if crc32c::crc32c(&b[..8]) == crc { v } else { 0 })
        }
        Ok(_) => Ok(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(LogError::Io { path, source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seg: u64, max: u64) -> LogOptions {
        LogOptions { segment_bytes: seg, max_bytes: max }
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("record-{i}-").repeat((i % 7 + 1) as usize).into_bytes()
    }

    #[test]
    fn append_sync_reopen_replays_unconfirmed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, rec) = Log::open(dir.path(), opts(4096, 1 << 20)).unwrap();
            assert!(rec.records.is_empty());
            for i in 0..100 {
                assert_eq!(log.append(&payload(i), i as i64).unwrap(), i);
            }
            log.sync().unwrap();
            assert_eq!(log.durable_below(), 100);
            for i in (0..40).rev() {
                log.confirm(i).unwrap();
            }
            log.confirm(50).unwrap();
            log.persist_cursor().unwrap();
            assert_eq!(log.unconfirmed(), 59);
        }
        let (log, rec) = Log::open(dir.path(), opts(4096, 1 << 20)).unwrap();
        assert!(rec.truncation.is_none());
        let seqs: Vec<u64> = rec.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (40..100).collect::<Vec<_>>(), "cursor at 40; 50 was confirmed out of order, so it replays");
        assert!(rec.records.iter().all(|r| r.payload == payload(r.seq) && r.timestamp_ms == r.seq as i64));
        assert_eq!(log.next_seq(), 100);
    }

    #[test]
    fn segments_roll_and_confirmed_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), opts(1024, 1 << 20)).unwrap();
        for i in 0..200 {
            log.append(&payload(i), 0).unwrap();
        }
        let files = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
                .count()
        };
        let before = files();
        assert!(before > 5);
        for i in 0..200 {
            log.confirm(i).unwrap();
        }
        assert_eq!(files(), 1, "only the active segment stays");
        assert_eq!(log.unconfirmed(), 0);
    }

    #[test]
    fn full_at_the_limit_then_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), opts(1024, 4096)).unwrap();
        let mut n = 0;
        let err = loop {
            match log.append(&[7u8; 100], 0) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(err.is_full(), "{err}");
        assert!(n >= 30);
        for i in 0..n / 2 {
            log.confirm(i).unwrap();
        }
        log.append(&[7u8; 100], 0).expect("space after confirmations");
        let e = log.append(&vec![0u8; 2000], 0).unwrap_err();
        assert!(matches!(e, LogError::RecordTooLarge { .. }) && !e.is_full());
    }

    #[test]
    fn read_from_skips_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), opts(512, 1 << 20)).unwrap();
        for i in 0..30 {
            log.append(&payload(i), 0).unwrap();
        }
        log.confirm(0).unwrap();
        log.confirm(3).unwrap();
        let got: Vec<u64> = log.read_from(2, 5).iter().map(|r| r.seq).collect();
        assert_eq!(got, vec![2, 4, 5, 6, 7]);
        // Sequential reads continue from the hint, across segments.
        let next: Vec<u64> = log.read_from(8, 100).iter().map(|r| r.seq).collect();
        assert_eq!(next, (8..30).collect::<Vec<_>>());
        assert!(log.read_from(2, 100).iter().all(|r| r.payload == payload(r.seq)));
        drop(log);
        let (lazy, rec) = Log::open_lazy(dir.path(), opts(512, 1 << 20)).unwrap();
        assert!(rec.records.is_empty());
        assert_eq!(rec.first_unconfirmed, 0, "the cursor was never persisted");
        assert_eq!(lazy.read_from(0, 3).iter().map(|r| r.seq).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            /// Damage anywhere: recovery never panics, never returns a corrupt record, and keeps
            /// every record before the damage.
            #[test]
            fn recovery_keeps_the_prefix_before_damage(
                n in 1u64..60,
                cut in proptest::option::of(0u64..4096),
                flips in proptest::collection::vec((0u64..4096, 1u8..=255), 0..4),
            ) {
                let dir = tempfile::tempdir().unwrap();
                {
                    let (mut log, _) = Log::open(dir.path(), opts(4096, 1 << 20)).unwrap();
                    for i in 0..n {
                        log.append(&payload(i), i as i64).unwrap();
                    }
                    log.sync().unwrap();
                }
                let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap()
                    .map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "seg")).collect();
                segs.sort();
                let target = &segs[segs.len() / 2];
                let mut bytes = std::fs::read(target).unwrap();
                let mut first_damage = u64::MAX;
                for (at, x) in &flips {
                    let at = (*at as usize).min(bytes.len() - 1);
                    bytes[at] ^= x;
                    first_damage = first_damage.min(at as u64);
                }
                if let Some(c) = cut {
                    bytes.truncate(c as usize);
                    first_damage = first_damage.min(c);
                }
                std::fs::write(target, &bytes).unwrap();
                let (_log, rec) = Log::open(dir.path(), opts(4096, 1 << 20)).unwrap();
                // Every returned record is one we wrote, in order, from 0 with no gap.
                for (i, r) in rec.records.iter().enumerate() {
                    prop_assert_eq!(r.seq, i as u64);
                    prop_assert_eq!(&r.payload, &payload(r.seq));
                }
                // Every record that ended before the damage in the damaged segment (and all in
                // earlier segments) survived.
                let base: u64 = target.file_stem().unwrap().to_str().unwrap().parse().unwrap();
                let mut pos = 0u64;
                let mut intact_end = base;
                for s in base..n {
                    let end = pos + HEADER_BYTES + payload(s).len() as u64;
                    if end > 4096 || end > first_damage { break; }
                    pos = end;
                    intact_end = s + 1;
                }
                prop_assert!(rec.records.len() as u64 >= intact_end,
                    "kept {} records, {} were intact", rec.records.len(), intact_end);
            }
        }
    }
}
