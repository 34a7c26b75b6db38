//! The shard state machine alone (no sockets): the per-message cost of the broker's decisions.
//!
//! - `fan_in_qos0`: 8 publishers on one shard, 64 PUBLISHes (64 B) per read each, one subscriber
//!   of `t/#`; measures decode, route, encode into the subscriber's output.
//! - `p2p_qos1`: 50 publisher/subscriber pairs, 16 QoS 1 PUBLISHes per read, the subscriber
//!   acknowledging what it got; measures the acknowledged path (PUBACK out, in-flight window).

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_core::config::Limits;
use sluice_core::packet::{encode, Connect, Packet, Properties, PubResp, Publish, SubOptions, Subscribe, Version};
use sluice_core::shard::Shard;

const V: Version = Version::V311;

fn wire(p: &Packet) -> BytesMut {
    let mut b = BytesMut::new();
    encode(p, V, &mut b);
    b
}

fn connect(shard: &mut Shard, conn: u64, id: &str) {
    shard.on_open(conn, 0);
    let c = Packet::Connect(Box::new(Connect {
        version: V,
        clean_start: true,
        keep_alive: 0,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }));
    shard.on_bytes(conn, &mut wire(&c), 0);
}

fn subscribe(shard: &mut Shard, conn: u64, filter: &str, qos: u8) {
    let s = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(filter.into(), SubOptions { qos, ..SubOptions::default() })],
        properties: Properties::default(),
    });
    shard.on_bytes(conn, &mut wire(&s), 0);
}

fn publishes(topic: &str, qos: u8, n: u16) -> BytesMut {
    let mut b = BytesMut::new();
    for i in 0..n {
        let p = Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: if qos > 0 { i + 1 } else { 0 },
            properties: Properties::default().into(),
            payload: Bytes::from(vec![7u8; 64]),
        });
        encode(&p, V, &mut b);
    }
    b
}

fn drain(shard: &mut Shard, conns: impl Iterator<Item = u64>) -> usize {
    let mut bytes = 0;
    for c in conns {
        if let Some(out) = shard.take_output(c) {
            bytes += out.len();
        }
        shard.on_output_drained(c, 0);
    }
    shard.drain_effects();
    bytes
}

fn fan_in(c: &mut Criterion) {
    let mut shard = Shard::new(0, 1, Limits::default(), 0);
    connect(&mut shard, 1000, "sub");
    subscribe(&mut shard, 1000, "t/#", 0);
    for p in 0..8 {
        connect(&mut shard, p, &format!("pub{p}"));
    }
    drain(&mut shard, (0..8).chain([1000]));
    let batch = publishes("t/a/b", 0, 64);
    for p in 0..8 {
        shard.on_bytes(p, &mut batch.clone(), 0);
    }
    // 64 deliveries of 2 + 2 + 5 + 64 bytes per publisher.
    assert_eq!(drain(&mut shard, [1000].into_iter()), 8 * 64 * 73, "every message reaches the subscriber");
    let mut g = c.benchmark_group("shard");
    g.throughput(Throughput::Elements(8 * 64));
    g.bench_function(BenchmarkId::new("fan_in_qos0", "8x64"), |b| {
        b.iter(|| {
            for p in 0..8 {
                shard.on_bytes(p, &mut batch.clone(), 0);
            }
            drain(&mut shard, [1000].into_iter())
        })
    });
}

fn p2p(c: &mut Criterion) {
    let pairs = 50u64;
    let mut shard = Shard::new(0, 1, Limits::default(), 0);
    for i in 0..pairs {
        connect(&mut shard, 1000 + i, &format!("sub{i}"));
        subscribe(&mut shard, 1000 + i, &format!("p/{i}"), 1);
        connect(&mut shard, i, &format!("pub{i}"));
    }
    drain(&mut shard, (0..pairs).chain(1000..1000 + pairs));
    let batches: Vec<BytesMut> = (0..pairs).map(|i| publishes(&format!("p/{i}"), 1, 16)).collect();
    // The subscriber's acknowledgements: its packet ids run 1.. as the window allows.
    let mut next_ack = vec![1u16; pairs as usize];
    let mut round = |shard: &mut Shard| {
        let mut delivered = 0;
        for i in 0..pairs {
            shard.on_bytes(i, &mut batches[i as usize].clone(), 0);
        }
        for i in 0..pairs {
            let s = 1000 + i;
            let got = shard.take_output(s).map_or(0, |o| o.len());
            // Each 64-byte QoS 1 delivery here is 2 + 2 + 5 + 64 bytes on the wire.
            let n = (got / 73) as u16;
            delivered += usize::from(n);
            let mut acks = BytesMut::new();
            for _ in 0..n {
                let id = next_ack[i as usize];
                next_ack[i as usize] = if id == u16::MAX { 1 } else { id + 1 };
                let ack = PubResp { packet_id: id, code: 0, properties: Properties::default() };
                encode(&Packet::PubAck(ack), V, &mut acks);
            }
            shard.on_bytes(s, &mut acks, 0);
            shard.take_output(i);
        }
        shard.drain_effects();
        delivered
    };
    // The workload is what it says: every message delivered and acknowledged, round after round.
    for _ in 0..3 {
        assert_eq!(round(&mut shard), (pairs * 16) as usize);
    }
    let mut g = c.benchmark_group("shard");
    g.throughput(Throughput::Elements(pairs * 16));
    g.bench_function(BenchmarkId::new("p2p_qos1", "50x16"), |b| b.iter(|| round(&mut shard)));
}

criterion_group!(benches, fan_in, p2p);
criterion_main!(benches);
