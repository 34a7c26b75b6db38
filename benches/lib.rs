//! Criterion benchmarks (`cargo bench -p sluice-benches`): codec, topic trie, and the hand-over of
//! record batches from a shard to the Kafka runtime. Results go in BENCHMARKS.md.
