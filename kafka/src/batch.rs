//! Kafka RecordBatch v2 (magic 2) encoding, straight from sluice's [`KafkaRecord`]s.
//!
//! Why: the rskafka path copies every record into owned `Vec`s and a `BTreeMap` of headers
//! (`to_record`), builds rskafka's own record structs, and then encodes each record into a
//! temporary `Vec` to learn its length. [`BatchEncoder`] computes each record's length
//! arithmetically and writes the fields in place, so an uncompressed batch costs one copy of each
//! key, value and header into the request buffer and no allocation per record; once its scratch
//! buffers have grown to the largest batch seen, encoding batch after batch allocates nothing
//! (the codec states — zstd context, snappy table, deflate state — are kept and reset, and LZ4
//! frames are assembled here from block compression, which keeps its state on the stack).
//!
//! Format: <https://kafka.apache.org/documentation/#recordbatch>; the header's layout is the
//! `OFF_*` constants below. rskafka's `protocol::record` (vendored in `third_party/rskafka`) is
//! the reference the unit tests decode with, librdkafka the one `tests/python/test_kafka_batch.py`
//! reads with after a round trip through a real broker. Compressed batches differ in bytes from
//! rskafka's (zstd here is one-shot with the content size in the frame, rskafka streams; rskafka's
//! LZ4 frames carry block and content checksums, these do not — Kafka's CRC covers them): both
//! are valid.
//!
//! Invariants:
//! - A batch is self-contained: baseOffset 0 and offset deltas `0..n` (the broker assigns real
//!   offsets), base timestamp = the first record's, maxTimestamp = the largest; it can be put into
//!   any produce request for any partition as is.
//! - Records are written in the order given; Kafka keeps that order within the partition.
//! - The CRC-32C (Castagnoli) covers every byte from `attributes` to the end of the batch (the
//!   compressed bytes when compressed), and is patched in after everything else is written;
//!   `batchLength` counts every byte after itself.
//! - On error nothing is appended: `out` is truncated back to its length before the call.
//! - Header order is the record's `headers` order (MQTT order); rskafka's `BTreeMap` sorts them.
//!
//! This module knows nothing of connections, partitions or requests: it turns records into bytes.

use bytes::{BufMut, BytesMut};
use sluice_core::bridge::KafkaRecord;
use sluice_core::config::Compression;

/// Bytes of a RecordBatch before its first record (Kafka's `RECORD_BATCH_OVERHEAD`).
pub const HEADER_BYTES: usize = 61;

// Offsets of the fields in a RecordBatch v2 header, all integers big-endian.
const OFF_BATCH_LENGTH: usize = 8; // i32: bytes after this field
const OFF_LEADER_EPOCH: usize = 12; // i32 partitionLeaderEpoch
const OFF_MAGIC: usize = 16; // i8, = 2
const OFF_CRC: usize = 17; // u32 CRC-32C of attributes..end
const OFF_ATTRIBUTES: usize = 21; // i16
const OFF_LAST_OFFSET_DELTA: usize = 23; // i32
const OFF_BASE_TIMESTAMP: usize = 27; // i64
const OFF_MAX_TIMESTAMP: usize = 35; // i64
const OFF_PRODUCER_ID: usize = 43; // i64
const OFF_PRODUCER_EPOCH: usize = 51; // i16
const OFF_BASE_SEQUENCE: usize = 53; // i32
const OFF_RECORD_COUNT: usize = 57; // i32

/// Bytes a record takes in a batch beyond its key, value and header bytes, about: its length,
/// attributes, timestamp and offset deltas, the key, value and header-count lengths and two
/// lengths per header, as varints of one to three bytes (fields under 8 KiB, timestamps within
/// ±1,000 s of the batch's first, four headers).
pub const RECORD_OVERHEAD_BYTES: usize = 32;

/// About what an uncompressed batch of `records` records with `bytes` of keys, values and
/// headers (`KafkaRecord::size`) takes: reserved before encoding, so the buffer does not regrow
/// (copying what it holds) in the middle of a batch (`realloc` copies were 1.6 % of the Kafka
/// thread's samples at 100 B). A hint, not a bound: a batch larger than it still encodes.
pub fn size_hint(records: usize, bytes: usize) -> usize {
    HEADER_BYTES + bytes + records * RECORD_OVERHEAD_BYTES
}

/// Scratch capacity an encoder keeps between batches; a larger batch's buffers are released
/// after it (so one huge batch does not pin its memory for the life of the producer).
pub const SCRATCH_RETAIN_BYTES: usize = 4 << 20;

/// Block size of the LZ4 frames written: 64 KiB, as Kafka's Java producer writes (and the
/// smallest a reader must buffer).
const LZ4_BLOCK_BYTES: usize = 64 << 10;
/// LZ4 frame header: magic, FLG (version 01, independent blocks — the only mode Kafka reads —
/// no block or content checksum, no content size: Kafka's CRC already covers the frame), BD (64
/// KiB blocks) and the header checksum byte, `(xxh32(FLG, BD) >> 8) & 0xff`. The same bytes as
/// Kafka's `KafkaLZ4BlockOutputStream`; checked by lz4's own frame decoder in the tests.
const LZ4_FRAME_HEADER: [u8; 7] = [0x04, 0x22, 0x4d, 0x18, 0x60, 0x40, 0x82];
/// Block-size word flag: the block is stored uncompressed.
const LZ4_UNCOMPRESSED: u32 = 0x8000_0000;
/// gzip member header: magic, deflate, no flags, no mtime, no extra flags, OS unknown (255).
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];
/// Kafka's default levels: gzip 6 (zlib's default), zstd 3.
const GZIP_LEVEL: u32 = 6;
const ZSTD_LEVEL: i32 = 3;

/// The idempotent/transactional producer fields of a batch. [`Producer::NONE`] (all -1) is the
/// plain producer; an idempotent producer sets its id and epoch and the sequence number of the
/// batch's first record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Producer {
    pub id: i64,
    pub epoch: i16,
    pub base_sequence: i32,
}

impl Producer {
    pub const NONE: Producer = Producer { id: -1, epoch: -1, base_sequence: -1 };
}

impl Default for Producer {
    fn default() -> Self {
        Producer::NONE
    }
}

/// What one [`BatchEncoder::encode`] call appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodedBatch {
    pub records: usize,
    /// Bytes appended to `out`: the whole batch, baseOffset included.
    pub bytes: usize,
    /// Bytes of the records section before compression (equal to `bytes - HEADER_BYTES` when
    /// uncompressed), for compression-ratio metrics.
    pub records_bytes: usize,
}

/// Why a batch could not be encoded. Nothing was appended to `out`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    #[error("a record batch needs at least one record")]
    Empty,
    /// A key, value, header or whole record longer than Kafka's signed 32-bit lengths.
    #[error("record {index}: {field} is {len} bytes, more than a Kafka length can say")]
    FieldTooLarge { index: usize, field: &'static str, len: usize },
    /// The record's timestamp minus the batch's base timestamp does not fit in an i64.
    #[error("record {index}: timestamp {timestamp_ms} is too far from the batch's first ({base_ms})")]
    TimestampRange { index: usize, timestamp_ms: i64, base_ms: i64 },
    #[error("record batch of {records} records: more than Kafka's 32-bit count and offsets allow")]
    TooManyRecords { records: usize },
    #[error("record batch is {len} bytes, more than a Kafka batch length can say")]
    BatchTooLarge { len: usize },
    #[error("{codec} compression of {len} bytes failed: {reason}")]
    Compression { codec: &'static str, len: usize, reason: String },
}

/// Writes RecordBatches; owns its scratch buffers and codec states so that encoding is free of
/// allocation once warm. One per producer (per shard): it is not shared.
#[derive(Default)]
pub struct BatchEncoder {
    /// The records section of a compressed batch, before compression.
    records: Vec<u8>,
    /// The compressed records section. Kept at its high-water length (not just capacity) so
    /// codecs that write into a slice need no zero-fill per batch.
    compressed: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    snappy: Option<snap::raw::Encoder>,
    deflate: Option<flate2::Compress>,
}

impl std::fmt::Debug for BatchEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEncoder").field("scratch_bytes", &self.scratch_bytes()).finish()
    }
}

/// Kafka's codec number in the low three attribute bits.
pub fn codec_id(c: Compression) -> i16 {
    match c {
        Compression::None => 0,
        Compression::Gzip => 1,
        Compression::Snappy => 2,
        Compression::Lz4 => 3,
        Compression::Zstd => 4,
    }
}

fn codec_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "no",
        Compression::Gzip => "gzip",
        Compression::Snappy => "snappy",
        Compression::Lz4 => "lz4",
        Compression::Zstd => "zstd",
    }
}

impl BatchEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of scratch memory held (capacity of both buffers), for a memory gauge.
    pub fn scratch_bytes(&self) -> usize {
        self.records.capacity() + self.compressed.capacity()
    }

    /// Appends one complete RecordBatch v2 holding `records`, in order, to `out`.
    ///
    /// Attributes: the codec of `compression`, CreateTime timestamps, not transactional, not a
    /// control batch. partitionLeaderEpoch is -1 (unknown to a producer; the broker sets it).
    pub fn encode<'a, I>(
        &mut self,
        records: I,
        compression: Compression,
        producer: Producer,
        out: &mut BytesMut,
    ) -> Result<EncodedBatch, BatchError>
    where
        I: IntoIterator<Item = &'a KafkaRecord>,
    {
        let start = out.len();
        let r = self.encode_inner(records.into_iter(), compression, producer, out, start);
        if r.is_err() {
            out.truncate(start);
        }
        self.trim();
        r
    }

    fn encode_inner<'a>(
        &mut self,
        records: impl Iterator<Item = &'a KafkaRecord>,
        compression: Compression,
        producer: Producer,
        out: &mut BytesMut,
        start: usize,
    ) -> Result<EncodedBatch, BatchError> {
        // Header with placeholders for what is known only at the end (length, CRC, last offset
        // delta, timestamps, count): written as zeros, patched below.
        out.reserve(HEADER_BYTES);
        out.put_bytes(0, HEADER_BYTES);
        let summary = if compression == Compression::None {
            write_records(records, out)?
        } else {
            self.records.clear();
            write_records(records, &mut self.records)?
        };
        let records_bytes = if compression == Compression::None {
            out.len() - start - HEADER_BYTES
        } else {
            let n = self.compress(compression)?;
            out.extend_from_slice(&self.compressed[..n]);
            self.records.len()
        };

        let len = out.len() - start;
        let batch_length = i32::try_from(len - OFF_LEADER_EPOCH).map_err(|_| BatchError::BatchTooLarge { len })?;
        let h = &mut out[start..];
        // baseOffset stays 0.
        h[OFF_BATCH_LENGTH..][..4].copy_from_slice(&batch_length.to_be_bytes());
        h[OFF_LEADER_EPOCH..][..4].copy_from_slice(&(-1i32).to_be_bytes());
        h[OFF_MAGIC] = 2;
        // Timestamp type bit 3 = 0: CreateTime. Bits 4 (transactional) and 5 (control) = 0.
        h[OFF_ATTRIBUTES..][..2].copy_from_slice(&codec_id(compression).to_be_bytes());
        h[OFF_LAST_OFFSET_DELTA..][..4].copy_from_slice(&(summary.count - 1).to_be_bytes());
        h[OFF_BASE_TIMESTAMP..][..8].copy_from_slice(&summary.base_ms.to_be_bytes());
        h[OFF_MAX_TIMESTAMP..][..8].copy_from_slice(&summary.max_ms.to_be_bytes());
        h[OFF_PRODUCER_ID..][..8].copy_from_slice(&producer.id.to_be_bytes());
        h[OFF_PRODUCER_EPOCH..][..2].copy_from_slice(&producer.epoch.to_be_bytes());
        h[OFF_BASE_SEQUENCE..][..4].copy_from_slice(&producer.base_sequence.to_be_bytes());
        h[OFF_RECORD_COUNT..][..4].copy_from_slice(&summary.count.to_be_bytes());
        let crc = crc32c::crc32c(&h[OFF_ATTRIBUTES..]);
        h[OFF_CRC..][..4].copy_from_slice(&crc.to_be_bytes());
        Ok(EncodedBatch { records: summary.count as usize, bytes: len, records_bytes })
    }

    /// Compresses `self.records` into `self.compressed[..n]`, returning n.
    fn compress(&mut self, compression: Compression) -> Result<usize, BatchError> {
        let input = &self.records[..];
        let fail =
            |reason: String| BatchError::Compression { codec: codec_name(compression), len: input.len(), reason };
        match compression {
            Compression::None => unreachable!("uncompressed batches are written in place"),
            Compression::Zstd => {
                let bound = zstd::zstd_safe::compress_bound(input.len());
                grow(&mut self.compressed, bound);
                let z = match &mut self.zstd {
                    Some(z) => z,
                    None => self.zstd.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| fail(e.to_string()))?),
                };
                z.compress_to_buffer(input, &mut self.compressed[..bound]).map_err(|e| fail(e.to_string()))
            }
            Compression::Snappy => {
                // Raw snappy, as rskafka and librdkafka write; Kafka's Java reader
                // (xerial's SnappyInputStream) reads a stream without its magic header as raw.
                let bound = snap::raw::max_compress_len(input.len());
                if bound == 0 {
                    return Err(fail("input too large for snappy".into()));
                }
                grow(&mut self.compressed, bound);
                let s = self.snappy.get_or_insert_with(snap::raw::Encoder::new);
                s.compress(input, &mut self.compressed[..bound]).map_err(|e| fail(e.to_string()))
            }
            Compression::Lz4 => {
                let blocks = input.len().div_ceil(LZ4_BLOCK_BYTES);
                let block_bound = lz4::block::compress_bound(LZ4_BLOCK_BYTES).map_err(|e| fail(e.to_string()))?;
                grow(&mut self.compressed, LZ4_FRAME_HEADER.len() + blocks * (4 + block_bound) + 4);
                let buf = &mut self.compressed[..];
                buf[..LZ4_FRAME_HEADER.len()].copy_from_slice(&LZ4_FRAME_HEADER);
                let mut at = LZ4_FRAME_HEADER.len();
                for block in input.chunks(LZ4_BLOCK_BYTES) {
                    let n = lz4::block::compress_to_buffer(block, None, false, &mut buf[at + 4..][..block_bound])
                        .map_err(|e| fail(e.to_string()))?;
                    // A block that does not shrink is stored as is (the frame format's rule).
                    let (word, n) = if n >= block.len() {
                        buf[at + 4..][..block.len()].copy_from_slice(block);
                        (block.len() as u32 | LZ4_UNCOMPRESSED, block.len())
                    } else {
                        (n as u32, n)
                    };
                    buf[at..at + 4].copy_from_slice(&word.to_le_bytes());
                    at += 4 + n;
                }
                buf[at..at + 4].copy_from_slice(&0u32.to_le_bytes()); // end mark
                Ok(at + 4)
            }
            Compression::Gzip => {
                // zlib's deflateBound plus the gzip header and trailer; the loop below grows the
                // buffer should deflate ever need more.
                let mut cap = GZIP_HEADER.len()
                    + input.len()
                    + (input.len() >> 12)
                    + (input.len() >> 14)
                    + (input.len() >> 25)
                    + 13
                    + 8;
                grow(&mut self.compressed, cap);
                self.compressed[..GZIP_HEADER.len()].copy_from_slice(&GZIP_HEADER);
                let d = self
                    .deflate
                    .get_or_insert_with(|| flate2::Compress::new(flate2::Compression::new(GZIP_LEVEL), false));
                d.reset();
                let mut at = GZIP_HEADER.len();
                loop {
                    let (in0, out0) = (d.total_in() as usize, d.total_out() as usize);
                    let status = d
                        .compress(&input[in0..], &mut self.compressed[at..cap - 8], flate2::FlushCompress::Finish)
                        .map_err(|e| fail(e.to_string()))?;
                    at += d.total_out() as usize - out0;
                    if status == flate2::Status::StreamEnd {
                        break;
                    }
                    let progressed = d.total_in() as usize > in0 || at > out0 + GZIP_HEADER.len();
                    if cap - 8 - at >= 64 && !progressed {
                        // Room left and nothing consumed or produced: deflate is stuck.
                        return Err(fail(format!("deflate stopped with {status:?}")));
                    }
                    cap *= 2;
                    grow(&mut self.compressed, cap);
                }
                let mut crc = flate2::Crc::new();
                crc.update(input);
                self.compressed[at..at + 4].copy_from_slice(&crc.sum().to_le_bytes());
                // ISIZE is the input length modulo 2^32 by definition.
                self.compressed[at + 4..at + 8].copy_from_slice(&(input.len() as u32).to_le_bytes());
                Ok(at + 8)
            }
        }
    }

    /// Releases scratch buffers grown past [`SCRATCH_RETAIN_BYTES`] by an outsized batch.
    fn trim(&mut self) {
        for b in [&mut self.records, &mut self.compressed] {
            if b.capacity() > SCRATCH_RETAIN_BYTES {
                b.truncate(SCRATCH_RETAIN_BYTES);
                b.shrink_to(SCRATCH_RETAIN_BYTES);
            }
        }
    }
}

/// Grows `v` to at least `len` initialized bytes; never shrinks (see `BatchEncoder::compressed`).
fn grow(v: &mut Vec<u8>, len: usize) {
    if v.len() < len {
        v.resize(len, 0);
    }
}

struct Summary {
    count: i32,
    base_ms: i64,
    max_ms: i64,
}

/// Writes the records section (uncompressed) into `buf`; one pass, in order.
fn write_records<'a>(
    records: impl Iterator<Item = &'a KafkaRecord>,
    buf: &mut impl BufMut,
) -> Result<Summary, BatchError> {
    let mut count = 0usize;
    let (mut base_ms, mut max_ms) = (0, 0);
    for (index, r) in records.enumerate() {
        if index == 0 {
            (base_ms, max_ms) = (r.timestamp_ms, r.timestamp_ms);
        }
        max_ms = max_ms.max(r.timestamp_ms);
        let offset_delta =
            i32::try_from(index).map_err(|_| BatchError::TooManyRecords { records: index.saturating_add(1) })?;
        let ts_delta = r.timestamp_ms.checked_sub(base_ms).ok_or(BatchError::TimestampRange {
            index,
            timestamp_ms: r.timestamp_ms,
            base_ms,
        })?;
        write_record(r, index, ts_delta, offset_delta, buf)?;
        count = index + 1;
    }
    if count == 0 {
        return Err(BatchError::Empty);
    }
    // `offset_delta` fitting proves count - 1 fits; the count itself must too.
    let count = i32::try_from(count).map_err(|_| BatchError::TooManyRecords { records: count })?;
    Ok(Summary { count, base_ms, max_ms })
}

fn len_i32(len: usize, index: usize, field: &'static str) -> Result<i32, BatchError> {
    i32::try_from(len).map_err(|_| BatchError::FieldTooLarge { index, field, len })
}

/// One record: length, attributes 0, timestampDelta, offsetDelta, key (-1 when none), value,
/// header count and each header's name and value — all lengths as zig-zag varints.
fn write_record(
    r: &KafkaRecord,
    index: usize,
    ts_delta: i64,
    offset_delta: i32,
    buf: &mut impl BufMut,
) -> Result<(), BatchError> {
    // The record's length comes first, so it is computed from the field sizes, not by encoding
    // into a temporary buffer.
    let key = r.key();
    let key_len = match key {
        Some(k) => len_i32(k.len(), index, "key")?,
        None => -1,
    };
    let value_len = len_i32(r.value.len(), index, "value")?;
    let mut headers = 0usize;
    let mut headers_bytes = 0usize;
    let mut too_large: Option<BatchError> = None;
    r.for_each_header(|name, value| {
        headers += 1;
        for (len, field) in [(name.len(), "header name"), (value.len(), "header value")] {
            match len_i32(len, index, field) {
                Ok(n) => headers_bytes += varint_len(n) + len,
                Err(e) => too_large = too_large.take().or(Some(e)),
            }
        }
    });
    if let Some(e) = too_large {
        return Err(e);
    }
    let header_count = len_i32(headers, index, "header count")?;
    let mut body = 1 + varlong_len(ts_delta) + varint_len(offset_delta);
    body += varint_len(key_len) + key_len.max(0) as usize;
    body += varint_len(value_len) + r.value.len();
    body += varint_len(header_count) + headers_bytes;
    let body_len = len_i32(body, index, "record")?;

    put_varint(buf, body_len);
    buf.put_u8(0); // attributes: unused in v2
    put_varlong(buf, ts_delta);
    put_varint(buf, offset_delta);
    put_varint(buf, key_len);
    if let Some(k) = key {
        buf.put_slice(k);
    }
    put_varint(buf, value_len);
    buf.put_slice(&r.value);
    put_varint(buf, header_count);
    r.for_each_header(|name, value| {
        put_varint(buf, name.len() as i32);
        buf.put_slice(name.as_bytes());
        put_varint(buf, value.len() as i32);
        buf.put_slice(value);
    });
    Ok(())
}

fn zigzag32(n: i32) -> u64 {
    ((n << 1) ^ (n >> 31)) as u32 as u64
}

fn zigzag64(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn uvarint_len(v: u64) -> usize {
    // 7 bits per byte; 0 takes one byte.
    (70 - (v | 1).leading_zeros() as usize) / 7
}

/// Bytes of `n` as a Kafka (zig-zag) varint.
pub fn varint_len(n: i32) -> usize {
    uvarint_len(zigzag32(n))
}

/// Bytes of `n` as a Kafka (zig-zag) varlong.
pub fn varlong_len(n: i64) -> usize {
    uvarint_len(zigzag64(n))
}

fn put_uvarint(buf: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// Writes `n` as a Kafka varint (zig-zag, then 7 bits per byte, low group first).
pub fn put_varint(buf: &mut impl BufMut, n: i32) {
    put_uvarint(buf, zigzag32(n));
}

/// Writes `n` as a Kafka varlong.
pub fn put_varlong(buf: &mut impl BufMut, n: i64) {
    put_uvarint(buf, zigzag64(n));
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::sync::Arc;

    use bytes::Bytes;
    use proptest::prelude::*;
    use rskafka::protocol::primitives::{Varint, Varlong};
    use rskafka::protocol::record::{
        ControlBatchOrRecords, Record as WireRecord, RecordBatch, RecordBatchCompression, RecordBatchTimestampType,
        RecordHeader,
    };
    use rskafka::protocol::traits::{ReadType, WriteType};
    use sluice_core::bridge::RecordKey;

    use super::*;

    const ALL: [Compression; 5] =
        [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];

    fn record(key: Option<&[u8]>, value: &[u8], headers: &[(&str, &[u8])], timestamp_ms: i64) -> KafkaRecord {
        let mut r = KafkaRecord::new(0, Arc::from("t"), Bytes::copy_from_slice(value), timestamp_ms);
        if let Some(k) = key {
            r = r.with_key(Bytes::copy_from_slice(k));
        }
        for (k, v) in headers {
            r.push_header(*k, Bytes::copy_from_slice(v));
        }
        r
    }

    fn sluice_like(i: usize, size: usize) -> KafkaRecord {
        let topic = format!("fleet/eu/car-{i}/speed");
        record(
            Some(topic.as_bytes()),
            &vec![(i % 251) as u8; size],
            &[
                ("mqtt.topic", topic.as_bytes()),
                ("mqtt.qos", b"1"),
                ("mqtt.retain", b"false"),
                ("mqtt.client_id", b"car-1"),
            ],
            1_764_000_000_000 + i as i64,
        )
    }

    #[test]
    fn the_size_hint_holds_a_batch_of_records_like_sluices() {
        // 100 B and 1 KiB payloads, four MQTT headers, timestamps a millisecond apart: the
        // producer reserves the hint, so a batch past it would regrow the buffer mid-batch.
        for (n, size) in [(1, 100), (500, 100), (2_000, 100), (100, 1_000), (10, 8_000)] {
            let records: Vec<KafkaRecord> = (0..n).map(|i| sluice_like(i, size)).collect();
            let bytes: usize = records.iter().map(KafkaRecord::size).sum();
            let (out, _) = encode(&records, Compression::None);
            let hint = size_hint(n, bytes);
            assert!(out.len() <= hint, "{n} × {size} B: {} > {hint}", out.len());
            // And not far above it: the hint is what is reserved.
            assert!(hint - out.len() <= n * 16 + HEADER_BYTES, "{n} × {size} B: {} ≪ {hint}", out.len());
        }
    }

    fn encode(records: &[KafkaRecord], c: Compression) -> (BytesMut, EncodedBatch) {
        let mut out = BytesMut::new();
        let e = BatchEncoder::new().encode(records, c, Producer::NONE, &mut out).unwrap();
        (out, e)
    }

    fn decode(bytes: &[u8]) -> RecordBatch {
        let mut cur = Cursor::new(bytes);
        let b = RecordBatch::read(&mut cur).unwrap();
        assert_eq!(cur.position() as usize, bytes.len(), "trailing bytes after the batch");
        b
    }

    fn rskafka_compression(c: Compression) -> RecordBatchCompression {
        match c {
            Compression::None => RecordBatchCompression::NoCompression,
            Compression::Gzip => RecordBatchCompression::Gzip,
            Compression::Snappy => RecordBatchCompression::Snappy,
            Compression::Lz4 => RecordBatchCompression::Lz4,
            Compression::Zstd => RecordBatchCompression::Zstd,
        }
    }

    /// Decodes with rskafka and checks every field against the input records.
    fn assert_round_trip(records: &[KafkaRecord], c: Compression) {
        let (out, e) = encode(records, c);
        assert_eq!((e.records, e.bytes), (records.len(), out.len()));
        let b = decode(&out);
        assert_eq!(b.base_offset, 0);
        assert_eq!(b.partition_leader_epoch, -1);
        assert_eq!(b.compression, rskafka_compression(c));
        assert_eq!(b.timestamp_type, RecordBatchTimestampType::CreateTime);
        assert!(!b.is_transactional);
        assert_eq!((b.producer_id, b.producer_epoch, b.base_sequence), (-1, -1, -1));
        assert_eq!(b.last_offset_delta, records.len() as i32 - 1);
        assert_eq!(b.first_timestamp, records[0].timestamp_ms);
        assert_eq!(b.max_timestamp, records.iter().map(|r| r.timestamp_ms).max().unwrap());
        let ControlBatchOrRecords::Records(got) = b.records else { panic!("control batch") };
        assert_eq!(got.len(), records.len());
        for (i, (g, r)) in got.iter().zip(records).enumerate() {
            assert_eq!(g.offset_delta, i as i32);
            assert_eq!(b.first_timestamp + g.timestamp_delta, r.timestamp_ms);
            assert_eq!(g.key.as_deref(), r.key());
            assert_eq!(g.value.as_deref(), Some(&r.value[..]));
            let headers: Vec<(&str, &[u8])> = g.headers.iter().map(|h| (h.key.as_str(), &h.value[..])).collect();
            let mut want: Vec<(String, Vec<u8>)> = Vec::new();
            r.for_each_header(|k, v| want.push((k.into(), v.into())));
            let want: Vec<(&str, &[u8])> = want.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
            assert_eq!(headers, want, "headers in the order given");
        }
    }

    #[test]
    fn routed_records_take_key_and_mqtt_headers_from_their_message() {
        let msg = Arc::new(sluice_core::message::Message {
            topic: "fleet/eu/car-7/speed".into(),
            payload: Bytes::from_static(b"88"),
            qos: 2,
            retain: true,
            properties: None,
            expiry_at_ms: None,
            origin: "car-7".into(),
        });
        let r = record(None, b"88", &[("sluice.error", b"x")], 5).with_source(
            msg,
            RecordKey::Level { start: 9, end: 14 },
            true,
        );
        assert_eq!(r.key(), Some(&b"car-7"[..]));
        for c in ALL {
            assert_round_trip(std::slice::from_ref(&r), c);
        }
        let (out, _) = encode(std::slice::from_ref(&r), Compression::None);
        let ControlBatchOrRecords::Records(got) = decode(&out).records else { panic!("control batch") };
        let names: Vec<&str> = got[0].headers.iter().map(|h| h.key.as_str()).collect();
        assert_eq!(names, ["mqtt.topic", "mqtt.qos", "mqtt.retain", "mqtt.client_id", "sluice.error"]);
        assert_eq!(got[0].headers[1].value, b"2");
    }

    #[test]
    fn crc32c_known_answer() {
        // Castagnoli's check value; IEEE CRC-32 of the same is 0xCBF43926.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn varints_match_kafka() {
        let cases: &[(i32, &[u8])] = &[
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (63, &[0x7e]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (i32::MAX, &[0xfe, 0xff, 0xff, 0xff, 0x0f]),
            (i32::MIN, &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        ];
        for &(n, want) in cases {
            let mut b = Vec::new();
            put_varint(&mut b, n);
            assert_eq!(b, want, "varint {n}");
            assert_eq!(varint_len(n), want.len(), "varint_len {n}");
            let mut r = Vec::new();
            Varint(n).write(&mut r).unwrap();
            assert_eq!(b, r, "rskafka varint {n}");
        }
        for n in [0, -1, 1, i32::MAX as i64 + 1, i32::MIN as i64 - 1, i64::MAX, i64::MIN] {
            let mut b = Vec::new();
            put_varlong(&mut b, n);
            let mut r = Vec::new();
            Varlong(n).write(&mut r).unwrap();
            assert_eq!(b, r, "varlong {n}");
            assert_eq!(varlong_len(n), b.len(), "varlong_len {n}");
        }
        let mut b = Vec::new();
        put_varlong(&mut b, i64::MIN);
        assert_eq!(b, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    }

    #[test]
    fn header_layout() {
        let (out, e) = encode(&[record(None, b"v", &[], 5)], Compression::Lz4);
        assert_eq!(e.bytes, out.len());
        assert_eq!(&out[..8], &[0; 8], "baseOffset");
        assert_eq!(i32::from_be_bytes(out[8..12].try_into().unwrap()) as usize, out.len() - 12);
        assert_eq!(&out[12..16], &[0xff; 4], "partitionLeaderEpoch -1");
        assert_eq!(out[16], 2, "magic");
        assert_eq!(u32::from_be_bytes(out[17..21].try_into().unwrap()), crc32c::crc32c(&out[21..]));
        assert_eq!(&out[21..23], &[0, 3], "attributes: lz4, CreateTime");
        assert_eq!(&out[57..61], &[0, 0, 0, 1], "record count");
    }

    #[test]
    fn every_codec_round_trips_keys_headers_and_empty_values() {
        let records = vec![
            record(Some(b"k"), b"hello", &[("mqtt.qos", b"1"), ("a", b"")], 1_000),
            record(None, b"", &[], 999), // earlier than the base: a negative delta
            record(Some(b""), b"x", &[("z", b"last"), ("b", b"first?")], 1_500),
            record(None, &[7; 3000], &[("mqtt.topic", b"a/b")], 1_200),
        ];
        for c in ALL {
            assert_round_trip(&records, c);
            assert_round_trip(&records[1..2], c);
        }
    }

    #[test]
    fn large_batches_span_several_lz4_blocks_and_incompressible_blocks() {
        // 300 KiB of pseudo-random bytes: lz4 stores blocks as is, gzip grows its bound.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..300 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let records = vec![record(Some(b"k"), &noise, &[], 1), sluice_like(1, 100_000)];
        for c in ALL {
            assert_round_trip(&records, c);
        }
    }

    #[test]
    fn lz4_frames_decode_with_lz4s_own_frame_decoder() {
        // The header checksum byte is a constant here; LZ4F checks it.
        let records: Vec<KafkaRecord> = (0..2000).map(|i| sluice_like(i, 100)).collect();
        let mut e = BatchEncoder::new();
        let mut out = BytesMut::new();
        let got = e.encode(&records, Compression::Lz4, Producer::NONE, &mut out).unwrap();
        let mut d = lz4::Decoder::new(&out[HEADER_BYTES..]).unwrap();
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut plain).unwrap();
        assert_eq!(plain.len(), got.records_bytes);
        assert!(got.records_bytes > 2 * LZ4_BLOCK_BYTES, "spans several blocks");
        assert_eq!(plain, e.records, "the uncompressed records section");
    }

    #[test]
    fn uncompressed_bytes_equal_rskafkas() {
        // The same field choices as rskafka's writer, given the same header order and
        // partitionLeaderEpoch (rskafka's producer writes 0; -1 is Java's "unknown" and what
        // librdkafka writes: the broker overwrites it either way).
        let records: Vec<KafkaRecord> =
            (0..16).map(|i| sluice_like(i, 100)).chain([record(None, b"", &[], 5)]).collect();
        let (ours, _) = encode(&records, Compression::None);
        let base = records[0].timestamp_ms;
        let theirs = RecordBatch {
            base_offset: 0,
            partition_leader_epoch: -1,
            last_offset_delta: records.len() as i32 - 1,
            first_timestamp: base,
            max_timestamp: records.iter().map(|r| r.timestamp_ms).max().unwrap(),
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            records: ControlBatchOrRecords::Records(
                records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| WireRecord {
                        timestamp_delta: r.timestamp_ms - base,
                        offset_delta: i as i32,
                        key: r.key().map(|k| k.to_vec()),
                        value: Some(r.value.to_vec()),
                        headers: r
                            .headers()
                            .iter()
                            .map(|(k, v)| RecordHeader { key: k.clone(), value: v.to_vec() })
                            .collect(),
                    })
                    .collect(),
            ),
            compression: RecordBatchCompression::NoCompression,
            is_transactional: false,
            timestamp_type: RecordBatchTimestampType::CreateTime,
        };
        let mut want = Vec::new();
        theirs.write(&mut want).unwrap();
        assert_eq!(&ours[..], &want[..]);
    }

    #[test]
    fn producer_fields_are_written() {
        let mut out = BytesMut::new();
        let p = Producer { id: 4242, epoch: 7, base_sequence: 100 };
        BatchEncoder::new().encode(&[record(None, b"v", &[], 1)], Compression::None, p, &mut out).unwrap();
        let b = decode(&out);
        assert_eq!((b.producer_id, b.producer_epoch, b.base_sequence), (4242, 7, 100));
    }

    #[test]
    fn appends_after_existing_bytes_and_back_to_back() {
        let mut out = BytesMut::from(&b"prefix"[..]);
        let mut e = BatchEncoder::new();
        let a = e.encode(&[sluice_like(0, 10)], Compression::Zstd, Producer::NONE, &mut out).unwrap();
        let b =
            e.encode(&[sluice_like(1, 10), sluice_like(2, 10)], Compression::None, Producer::NONE, &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(out.len(), 6 + a.bytes + b.bytes);
        let _ = decode(&out[6..6 + a.bytes]);
        let second = decode(&out[6 + a.bytes..]);
        assert_eq!(second.last_offset_delta, 1, "each batch's offsets start at 0");
    }

    #[test]
    fn errors_append_nothing() {
        let mut e = BatchEncoder::new();
        let mut out = BytesMut::from(&b"keep"[..]);
        assert!(matches!(e.encode(&[], Compression::None, Producer::NONE, &mut out), Err(BatchError::Empty)));
        let far = [record(None, b"a", &[], i64::MAX), record(None, b"b", &[], -5)];
        for c in ALL {
            let err = e.encode(&far, c, Producer::NONE, &mut out).unwrap_err();
            assert!(matches!(err, BatchError::TimestampRange { index: 1, .. }), "{err}");
            assert_eq!(&out[..], b"keep");
        }
    }

    #[test]
    fn warm_encoder_keeps_its_buffers() {
        // Once the scratch buffers have grown, later batches of the same size reuse them: the
        // same allocations (pointers) and capacities, for every codec.
        let records: Vec<KafkaRecord> = (0..256).map(|i| sluice_like(i, 1024)).collect();
        let mut e = BatchEncoder::new();
        let mut out = BytesMut::with_capacity(1 << 20);
        for c in ALL {
            out.clear();
            e.encode(&records, c, Producer::NONE, &mut out).unwrap();
        }
        let before = (e.records.as_ptr(), e.compressed.as_ptr(), e.scratch_bytes(), out.capacity());
        for _ in 0..3 {
            for c in ALL {
                out.clear();
                e.encode(&records, c, Producer::NONE, &mut out).unwrap();
            }
        }
        assert_eq!(before, (e.records.as_ptr(), e.compressed.as_ptr(), e.scratch_bytes(), out.capacity()));
    }

    #[test]
    fn outsized_scratch_is_released() {
        let mut e = BatchEncoder::new();
        let mut out = BytesMut::new();
        let big = record(None, &vec![1; SCRATCH_RETAIN_BYTES * 2], &[], 0);
        e.encode([&big], Compression::Zstd, Producer::NONE, &mut out).unwrap();
        assert!(e.scratch_bytes() <= 2 * SCRATCH_RETAIN_BYTES, "{}", e.scratch_bytes());
        let _ = decode(&out);
    }

    fn arb_record() -> impl Strategy<Value = KafkaRecord> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(("[a-z.]{0,12}", proptest::collection::vec(any::<u8>(), 0..20)), 0..6),
            -(1i64 << 40)..(1i64 << 42),
        )
            .prop_map(|(key, value, headers, ts)| {
                let mut r = KafkaRecord::new(0, Arc::from("t"), Bytes::from(value), ts);
                if let Some(k) = key {
                    r = r.with_key(Bytes::from(k));
                }
                for (k, v) in headers {
                    r.push_header(k, Bytes::from(v));
                }
                r
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_batches_round_trip(records in proptest::collection::vec(arb_record(), 1..40), c in 0usize..5) {
            assert_round_trip(&records, ALL[c]);
        }
    }
}
