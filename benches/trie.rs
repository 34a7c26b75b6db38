//! Topic-trie insert and match with up to 1M subscriptions, wildcards mixed in.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice_core::topic::Trie;

/// Subscriptions shaped like a fleet: 80 % per-car exact filters, 10 % per-group `+`, 10 %
/// per-group `#`; cars sit in groups of 10, groups in 7 regions.
fn filters(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 10 {
            0 => format!("fleet/r{}/group-{}/+/speed", (i / 10) % 7, i / 10),
            1 => format!("fleet/r{}/group-{}/#", (i / 10) % 7, i / 10),
            _ => format!("fleet/r{}/group-{}/car-{i}/speed", (i / 10) % 7, i / 10),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("trie");
    g.sample_size(20);
    for n in [10_000usize, 1_000_000] {
        let fs = filters(n);
        let mut trie: Trie<u32, ()> = Trie::default();
        for (i, f) in fs.iter().enumerate() {
            trie.insert(f, i as u32, ());
        }
        // Topics of cars that exist: each matches its car, its group's `+` and its group's `#`.
        let topics: Vec<String> = (0..1024)
            .map(|k| {
                let i = (k * 7919 % (n / 10)) * 10 + 2;
                format!("fleet/r{}/group-{}/car-{i}/speed", (i / 10) % 7, i / 10)
            })
            .collect();
        g.bench_with_input(BenchmarkId::new("match", n), &trie, |b, trie| {
            let mut k = 0usize;
            b.iter(|| {
                k = (k + 1) % topics.len();
                let mut hits = 0;
                trie.for_each_match(&topics[k], |_, _| hits += 1);
                assert_eq!(hits, 3);
                black_box(hits)
            })
        });
        g.bench_with_input(BenchmarkId::new("insert+remove", n), &fs, |b, fs| {
            let mut t = trie_from(fs);
            let mut i = 0usize;
            b.iter(|| {
                i = i.wrapping_add(1);
                let f = format!("fleet/new/{i}/+/x");
                t.insert(&f, u32::MAX, ());
                t.remove(&f, &u32::MAX);
            })
        });
    }
    g.finish();
}

fn trie_from(fs: &[String]) -> Trie<u32, ()> {
    let mut t = Trie::default();
    for (i, f) in fs.iter().enumerate() {
        t.insert(f, i as u32, ());
    }
    t
}

criterion_group!(benches, bench);
criterion_main!(benches);
