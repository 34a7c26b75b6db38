//! Spill-log append throughput, 100 B and 1 KiB records, without and with group commit (one msync
//! per 256 records), against a plain sequential `write` of the same bytes to a file (the device's
//! limit for this access pattern) — all in the same run.

use std::io::Write;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_storage::{Log, LogOptions, HEADER_BYTES};

const BATCH: usize = 256;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("spill_append");
    for size in [100usize, 1024] {
        let payload = vec![0xA5u8; size];
        g.throughput(Throughput::Bytes((size as u64 + HEADER_BYTES) * BATCH as u64));
        for (name, sync) in [("no_sync", false), ("group_commit", true)] {
            g.bench_with_input(BenchmarkId::new(name, size), &payload, |b, payload| {
                let dir = tempfile::tempdir().unwrap();
                let (mut log, _) =
                    Log::open(dir.path(), LogOptions { segment_bytes: 64 << 20, max_bytes: 1 << 40 }).unwrap();
                b.iter(|| {
                    for _ in 0..BATCH {
                        let seq = log.append(payload, 0).unwrap();
                        // Keep the disk bounded: confirm as we go (segments get deleted).
                        if seq >= 1 << 16 {
                            log.confirm(seq - (1 << 16)).unwrap();
                        }
                    }
                    if sync {
                        log.sync().unwrap();
                    }
                })
            });
        }
        g.bench_with_input(BenchmarkId::new("plain_write", size), &payload, |b, _| {
            let dir = tempfile::tempdir().unwrap();
            let mut f = std::fs::File::create(dir.path().join("plain")).unwrap();
            let frame = vec![0u8; size + HEADER_BYTES as usize];
            let mut written = 0u64;
            b.iter(|| {
                for _ in 0..BATCH {
                    f.write_all(&frame).unwrap();
                }
                written += (frame.len() * BATCH) as u64;
                if written > 1 << 30 {
                    f.set_len(0).unwrap();
                    written = 0;
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("plain_write_fdatasync", size), &payload, |b, _| {
            let dir = tempfile::tempdir().unwrap();
            let mut f = std::fs::File::create(dir.path().join("plain")).unwrap();
            let frame = vec![0u8; size + HEADER_BYTES as usize];
            b.iter(|| {
                for _ in 0..BATCH {
                    f.write_all(&frame).unwrap();
                }
                f.sync_data().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
