//! Cross-shard hand-over: a batch of messages from one shard to another over glommio's channel
//! mesh — the path every publish takes to subscribers on other cores — and the answer back. Two
//! executors pinned to different CPUs, as in the broker; measured per round trip of one batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use sluice_core::shard::{Message, Msg, ShardMsg};

fn message(i: usize) -> Msg {
    Arc::new(Message {
        topic: format!("fleet/eu/car-{i}/speed"),
        payload: Bytes::from_static(&[0u8; 64]),
        qos: 1,
        retain: false,
        properties: None,
        expiry_at_ms: None,
        origin: Arc::from("car-1"),
    })
}

/// `iters` round trips of a batch of `n` messages between two pinned executors; the time the
/// sending side measured.
fn round_trips(n: usize, iters: u64) -> Duration {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mesh = MeshBuilder::<Vec<ShardMsg>, _>::full(2, 64);
    let echo = {
        let mesh = mesh.clone();
        LocalExecutorBuilder::new(Placement::Fixed(1 % cpus))
            .spawn(move || async move {
                let (senders, receivers) = mesh.join().await.unwrap();
                let peer = 1 - senders.peer_id(); // ids follow the order of joining
                while let Ok(Some(batch)) = receivers.recv_from(peer).await {
                    if senders.send_to(peer, batch).await.is_err() {
                        break;
                    }
                }
            })
            .unwrap()
    };
    let timed = LocalExecutorBuilder::new(Placement::Fixed(0))
        .spawn(move || async move {
            let (senders, receivers) = mesh.join().await.unwrap();
            let peer = 1 - senders.peer_id();
            let batch: Vec<ShardMsg> = (0..n).map(|i| ShardMsg::Publish(message(i))).collect();
            let start = Instant::now();
            for _ in 0..iters {
                // Cloning the batch is cloning pointers, as the broker's fan-out to each shard does.
                let out = batch.iter().map(|m| match m {
                    ShardMsg::Publish(m) => ShardMsg::Publish(m.clone()),
                    _ => unreachable!(),
                });
                senders.send_to(peer, out.collect()).await.unwrap();
                let back = receivers.recv_from(peer).await.unwrap().unwrap();
                assert_eq!(back.len(), n);
            }
            let took = start.elapsed();
            drop(senders);
            took
        })
        .unwrap();
    let took = timed.join().unwrap();
    echo.join().unwrap();
    took
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_shard");
    g.sample_size(20);
    for n in [1usize, 64, 1024] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("round_trip", n), &n, |b, &n| b.iter_custom(|iters| round_trips(n, iters)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
