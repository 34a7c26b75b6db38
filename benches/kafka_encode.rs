//! Per-record cost of turning sluice's produce requests into one Kafka RecordBatch v2, two ways:
//! - `sluice_*`: `sluice_kafka::batch::BatchEncoder`, written straight from the `KafkaRecord`s
//!   into a reused request buffer (uncompressed, lz4, zstd);
//! - `rskafka_none`: the path the producer takes today: `sluice_kafka::to_record` per request (key,
//!   value and headers copied into `Vec`s and a `BTreeMap`), rskafka's wire records built from
//!   those (as its `build_produce_request` does) and rskafka's `RecordBatch` encoder.
//!
//! Records as sluice makes them: the MQTT topic as key and the four default headers
//! (`mqtt.topic`, `mqtt.qos`, `mqtt.retain`, `mqtt.client_id`), 100 B and 1 KiB payloads, batches of
//! 1, 16 and 256. Criterion's throughput is records, so time / N is ns per record.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rskafka::protocol::record::{
    ControlBatchOrRecords, Record as WireRecord, RecordBatch, RecordBatchCompression, RecordBatchTimestampType,
    RecordHeader,
};
use rskafka::protocol::traits::WriteType;
use sluice_core::bridge::{KafkaRecord, ProduceRequest, RecordKey};
use sluice_core::config::Compression;
use sluice_core::message::Message;
use sluice_kafka::batch::{BatchEncoder, Producer};

fn request(i: u64, size: usize) -> ProduceRequest {
    let topic = format!("fleet/eu/group-3/car-{i}/speed");
    ProduceRequest {
        id: i,
        // As the router makes them: key and the four MQTT headers read from the message.
        record: KafkaRecord::new(
            0,
            Arc::from("iot-telemetry"),
            Bytes::from(vec![(i % 251) as u8; size]),
            1_764_000_000_000 + i as i64,
        )
        .with_source(
            Arc::new(Message {
                topic,
                payload: Bytes::new(),
                qos: 1,
                retain: false,
                properties: None,
                expiry_at_ms: None,
                origin: format!("car-{}", i % 64).into(),
            }),
            RecordKey::Topic,
            true,
        ),
        durable: false,
    }
}

/// Today's path: `to_record`, rskafka's wire records, rskafka's encoder (uncompressed).
fn rskafka_encode(requests: &[ProduceRequest], out: &mut Vec<u8>) {
    let records: Vec<rskafka::record::Record> = requests.iter().map(sluice_kafka::to_record).collect();
    let first = records[0].timestamp;
    let max = records.iter().map(|r| r.timestamp).max().unwrap_or(first);
    let n = records.len() as i32;
    let wire = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| WireRecord {
            key: r.key,
            value: r.value,
            timestamp_delta: (r.timestamp - first).num_milliseconds(),
            offset_delta: i as i32,
            headers: r.headers.into_iter().map(|(key, value)| RecordHeader { key, value }).collect(),
        })
        .collect();
    let batch = RecordBatch {
        base_offset: 0,
        partition_leader_epoch: 0,
        last_offset_delta: n - 1,
        is_transactional: false,
        base_sequence: -1,
        compression: RecordBatchCompression::NoCompression,
        timestamp_type: RecordBatchTimestampType::CreateTime,
        producer_id: -1,
        producer_epoch: -1,
        first_timestamp: first.timestamp_millis(),
        max_timestamp: max.timestamp_millis(),
        records: ControlBatchOrRecords::Records(wire),
    };
    out.clear();
    batch.write(out).unwrap();
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("kafka_encode");
    for size in [100usize, 1024] {
        for n in [1usize, 16, 256] {
            let requests: Vec<ProduceRequest> = (0..n as u64).map(|i| request(i, size)).collect();
            g.throughput(Throughput::Elements(n as u64));
            let param = format!("{size}B/{n}");
            for (name, comp) in [
                ("sluice_none", Compression::None),
                ("sluice_lz4", Compression::Lz4),
                ("sluice_zstd", Compression::Zstd),
            ] {
                let mut enc = BatchEncoder::new();
                let mut out = BytesMut::new();
                g.bench_with_input(BenchmarkId::new(name, &param), &requests, |b, r| {
                    b.iter(|| {
                        out.clear();
                        enc.encode(r.iter().map(|q| &q.record), comp, Producer::NONE, &mut out).unwrap()
                    })
                });
            }
            let mut out = Vec::new();
            g.bench_with_input(BenchmarkId::new("rskafka_none", &param), &requests, |b, r| {
                b.iter(|| rskafka_encode(r, &mut out))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
