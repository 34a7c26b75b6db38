//! Criterion benchmarks (`cargo bench -p sluice-benches`): codec, topic trie, cross-shard
//! hand-over, the hand-over of record batches from a shard to the Kafka runtime, Kafka record
//! batching and the spill log. Results go in BENCHMARKS.md.
