//! Writes one RecordBatch v2 encoded by `sluice_kafka::batch::BatchEncoder` to stdout, for
//! tests/python/test_kafka_batch.py to produce into a real Kafka and read back with librdkafka
//! (an implementation independent of the one the unit tests decode with).
//!
//! `encode_batch CODEC N`: CODEC is none, gzip, snappy, lz4 or zstd; the N records are a
//! function of their index only, so the test can rebuild what it should read.

use std::io::Write;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sluice_core::bridge::{KafkaRecord, RecordKey};
use sluice_core::config::Compression;
use sluice_kafka::batch::{BatchEncoder, Producer};

fn record(i: usize) -> KafkaRecord {
    // The same rules as `expected(i)` in the Python test.
    let key = (i % 5 != 4).then(|| Bytes::from(format!("key-{i}")));
    let value = if i % 7 == 3 { Bytes::new() } else { Bytes::from(format!("value-{i}-").repeat(i % 13 + 1)) };
    KafkaRecord {
        cluster: 0,
        mapping: 0,
        topic: Arc::from("unused"),
        key: key.map_or(RecordKey::None, RecordKey::Bytes),
        value,
        source: None,
        mqtt_headers: false,
        node: None,
        // Not sorted by name: Kafka keeps header order, and so must the encoder.
        headers: vec![
            ("mqtt.topic".into(), Bytes::from(format!("t/{i}"))),
            ("mqtt.qos".into(), Bytes::from_static(b"1")),
            ("z".into(), Bytes::new()),
            ("a".into(), Bytes::from(i.to_string())),
        ],
        timestamp_ms: 1_764_000_000_000 + 3 * i as i64 - (i % 4) as i64,
        dead_letter: None,
        partition: None,
    }
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
