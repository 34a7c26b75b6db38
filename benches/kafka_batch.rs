//! Kafka record batching: what a partition producer does per batch before the network — our
//! produce requests turned into rskafka records (`sluice_kafka::to_record`), built into one
//! record batch and encoded, uncompressed and with the codecs sluice offers. Per batch of N
//! 100-byte MQTT payloads with an MQTT topic key and one header.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rskafka::protocol::record::{
    ControlBatchOrRecords, Record as WireRecord, RecordBatch, RecordBatchCompression, RecordBatchTimestampType,
    RecordHeader,
};
use rskafka::protocol::traits::WriteType;
use sluice_core::bridge::{KafkaRecord, ProduceRequest, RecordKey};

fn request(i: u64) -> ProduceRequest {
    ProduceRequest {
        id: i,
        record: KafkaRecord {
            cluster: 0,
            mapping: 0,
            topic: Arc::from("iot-telemetry"),
            key: RecordKey::Bytes(Bytes::from(format!("fleet/eu/group-3/car-{i}/speed"))),
            source: None,
            mqtt_headers: false,
            value: Bytes::from(vec![(i % 251) as u8; 100]),
            headers: vec![("mqtt.qos".into(), Bytes::from_static(b"1"))],
            timestamp_ms: 1_764_000_000_000 + i as i64,
            dead_letter: None,
            partition: None,
        },
        durable: false,
    }
}

/// What rskafka's producer builds from a batch of records (as `build_produce_request` does).
fn encode(requests: &[ProduceRequest], compression: RecordBatchCompression, out: &mut Vec<u8>) {
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
        compression,
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
    let mut g = c.benchmark_group("kafka_batch");
    for n in [64usize, 1024] {
        let requests: Vec<ProduceRequest> = (0..n as u64).map(request).collect();
        g.throughput(Throughput::Elements(n as u64));
        for (name, comp) in [
            ("none", RecordBatchCompression::NoCompression),
            ("lz4", RecordBatchCompression::Lz4),
            ("zstd", RecordBatchCompression::Zstd),
        ] {
            let mut out = Vec::new();
            g.bench_with_input(BenchmarkId::new(name, n), &requests, |b, r| b.iter(|| encode(r, comp, &mut out)));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
