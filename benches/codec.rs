//! PUBLISH decode and encode, MQTT 3.1.1 and 5.0, 64- and 1024-byte payloads.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_core::packet::{decode, encode, Packet, Properties, Publish, Version};

fn publish(payload: usize, v5: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: 1,
        retain: false,
        topic: "fleet/eu/group-3/car-1045107/speed".into(),
        packet_id: 42,
        properties: if v5 {
            Properties { user_properties: vec![("tenant".into(), "acme".into())], ..Default::default() }.into()
        } else {
            Properties::default().into()
        },
        payload: Bytes::from(vec![7u8; payload]),
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish");
    for (version, name) in [(Version::V311, "v3.1.1"), (Version::V5, "v5")] {
        for size in [64usize, 1024] {
            let p = publish(size, version.is_v5());
            let mut wire = BytesMut::new();
            encode(&p, version, &mut wire);
            // 64 packets back to back, as a socket read would hand them over.
            let mut batch = BytesMut::new();
            for _ in 0..64 {
                batch.extend_from_slice(&wire);
            }
            let batch = batch.freeze();
            g.throughput(Throughput::Elements(64));
            g.bench_with_input(BenchmarkId::new(format!("decode/{name}"), size), &batch, |b, batch| {
                b.iter(|| {
                    let mut buf = BytesMut::from(&batch[..]);
                    while let Some(p) = decode(&mut buf, Some(version), usize::MAX).unwrap() {
                        black_box(p);
                    }
                })
            });
            g.bench_with_input(BenchmarkId::new(format!("encode/{name}"), size), &p, |b, p| {
                let mut out = BytesMut::with_capacity(64 * (size + 64));
                b.iter(|| {
                    out.clear();
                    for _ in 0..64 {
                        encode(black_box(p), version, &mut out);
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
