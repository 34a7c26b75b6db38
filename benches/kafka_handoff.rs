//! The cost of handing record batches from a shard (a plain thread here, glommio in sluice) to the
//! Kafka runtime (tokio) over a bounded mpsc channel, and the results back over an unbounded one:
//! the price of hosting rskafka on tokio beside glommio. Measured per round trip of one batch.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_core::bridge::{KafkaRecord, ProduceRequest, ProduceResult};
use tokio::sync::mpsc;

fn record(i: u64) -> ProduceRequest {
    ProduceRequest {
        id: i,
        record: KafkaRecord::new(0, Arc::from("iot-telemetry"), Bytes::from_static(&[0u8; 100]), 0)
            .with_key(Bytes::from_static(b"fleet/eu/car-1/speed")),
        durable: false,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
    let (req_tx, mut req_rx) = mpsc::channel::<Vec<ProduceRequest>>(1024);
    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<Vec<ProduceResult>>();
    // The Kafka side: answers every record at once (no Kafka), so only the hand-over is measured.
    rt.spawn(async move {
        while let Some(batch) = req_rx.recv().await {
            let out = batch
                .iter()
                .map(|r| ProduceResult::failed(r.id, sluice_core::bridge::ProduceError::TimedOut))
                .collect();
            if res_tx.send(out).is_err() {
                break;
            }
        }
    });
    let mut g = c.benchmark_group("kafka_handoff");
    for n in [1usize, 64, 1024] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("round_trip", n), &n, |b, &n| {
            b.iter(|| {
                let batch: Vec<ProduceRequest> = (0..n as u64).map(record).collect();
                req_tx.blocking_send(batch).unwrap();
                let back = res_rx.blocking_recv().unwrap();
                assert_eq!(back.len(), n);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
