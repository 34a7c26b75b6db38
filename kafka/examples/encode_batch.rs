//! Writes one RecordBatch v2 encoded by `sluice_kafka::batch::BatchEncoder` to stdout, for
//! tests/python/test_kafka_batch.py to produce into a real Kafka and read back with librdkafka
//! (an implementation independent of the one the unit tests decode with).
//!
//! `encode_batch CODEC N`: CODEC is none, gzip, snappy, lz4 or zstd; the N records are a
//! function of their index only, so the test can rebuild what it should read.

use std::io::Write;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sluice_core::bridge::KafkaRecord;
use sluice_core::config::Compression;
use sluice_kafka::batch::{BatchEncoder, Producer};

fn record(i: usize) -> KafkaRecord {
    // The same rules as `expected(i)` in the Python test.
    let key = (i % 5 != 4).then(|| Bytes::from(format!("key-{i}")));
    let value = if i % 7 == 3 { Bytes::new() } else { Bytes::from(format!("value-{i}-").repeat(i % 13 + 1)) };
    let mut r = KafkaRecord::new(0, Arc::from("unused"), value, 1_764_000_000_000 + 3 * i as i64 - (i % 4) as i64);
    if let Some(k) = key {
        r = r.with_key(k);
    }
    // Not sorted by name: Kafka keeps header order, and so must the encoder.
    r.push_header("mqtt.topic", Bytes::from(format!("t/{i}")));
    r.push_header("mqtt.qos", Bytes::from_static(b"1"));
    r.push_header("z", Bytes::new());
    r.push_header("a", Bytes::from(i.to_string()));
    r
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(codec), Some(Ok(n))) = (args.get(1), args.get(2).map(|n| n.parse::<usize>())) else {
        eprintln!("usage: encode_batch none|gzip|snappy|lz4|zstd N");
        std::process::exit(2);
    };
    let compression = match codec.as_str() {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "snappy" => Compression::Snappy,
        "lz4" => Compression::Lz4,
        "zstd" => Compression::Zstd,
        other => {
            eprintln!("unknown codec {other}");
            std::process::exit(2);
        }
    };
    let records: Vec<KafkaRecord> = (0..n).map(record).collect();
    let mut out = BytesMut::new();
    if let Err(e) = BatchEncoder::new().encode(&records, compression, Producer::NONE, &mut out) {
        eprintln!("encode_batch: {e}");
        std::process::exit(1);
    }
    std::io::stdout().write_all(&out).expect("stdout");
}
