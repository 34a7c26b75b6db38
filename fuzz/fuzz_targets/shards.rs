//! The in-memory multi-shard broker (`sluice_core::shard::sim`) driven by arbitrary action
//! streams: connections on several shards sharing client ids (takeover races), every packet
//! kind, raw bytes, lost connections, shard messages in any order the mesh allows, ticks and
//! failing store commits; invariants checked after every step.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sluice_core::shard::sim::Sim::run(data);
});
