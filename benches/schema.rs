//! Payload schema costs per message, for a typical ~200-byte telemetry JSON: JSON Schema
//! validation (parse + validate, what a `schema` mapping does), JSON → Avro in the Confluent wire
//! format (`mode = "encode"`, through the cache as the producer calls it), and Avro → JSON
//! (`mode = "decode"`, with the writer's schema as reader).
//!
//! Each new path beside the one it replaced, in the same run: `json_schema_validate` (serde_json
//! `Value` parse + validate) against `json_schema_validate_reused` (parse into the previous
//! payload's value, as each Kafka thread's cache does), `json_to_avro_via_value` (serde_json
//! parse + encode) against `json_to_avro_streaming` (written while reading). `--bench
//! schema_mimalloc` is the same with the broker's allocator.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use sluice_schema::check::{Cache, Fetched, Inbound, Need, Outbound, Outcome, Schemas};
use sluice_schema::local::{Compiled, Kind, LocalSchemas};
use sluice_schema::registry::{RegistryClient, RegistrySettings, SubjectVersion};
use sluice_schema::AvroSchema;

const JSON: &[u8] = br#"{"device":"fleet-eu-car-000123","ts":1733050000123,"temp":21.75,"humidity":48.2,"battery":87,"ok":true,"pos":{"lat":48.85661,"lon":2.35222,"alt":35.5},"firmware":"4.2.1-rc3","status":"DRIVING"}"#;

const JSON_SCHEMA: &str = r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object",
 "required":["device","ts","temp","pos"],
 "properties":{"device":{"type":"string","maxLength":64},"ts":{"type":"integer"},"temp":{"type":"number"},
  "humidity":{"type":"number","minimum":0,"maximum":100},"battery":{"type":"integer","minimum":0,"maximum":100},
  "ok":{"type":"boolean"},"firmware":{"type":"string"},"status":{"enum":["PARKED","DRIVING","CHARGING"]},
  "pos":{"type":"object","required":["lat","lon"],"properties":{"lat":{"type":"number"},"lon":{"type":"number"},"alt":{"type":"number"}}}}}"#;

const AVRO: &str = r#"{"type":"record","name":"Telemetry","namespace":"iot","fields":[
 {"name":"device","type":"string"},{"name":"ts","type":"long"},{"name":"temp","type":"double"},
 {"name":"humidity","type":["null","double"],"default":null},{"name":"battery","type":"int"},
 {"name":"ok","type":"boolean"},
 {"name":"pos","type":{"type":"record","name":"Pos","fields":[{"name":"lat","type":"double"},{"name":"lon","type":"double"},{"name":"alt","type":["null","double"],"default":null}]}},
 {"name":"firmware","type":"string"},
 {"name":"status","type":{"type":"enum","name":"Status","symbols":["PARKED","DRIVING","CHARGING"]}}]}"#;

fn cache() -> Cache {
    let client = RegistryClient::new(
        "r",
        &RegistrySettings { url: "http://127.0.0.1:9".into(), timeout_ms: 1, ..Default::default() },
    )
    .unwrap();
    let schemas = Schemas {
        local: Arc::new(LocalSchemas::load(&[]).unwrap()),
        registries: vec![(client, Duration::from_secs(3600))],
    };
    let mut c = Cache::new(Arc::new(schemas));
    let v = SubjectVersion { id: 1, version: 1, schema: Arc::new(AvroSchema::parse(AVRO).unwrap()) };
    c.store(
        Need::Subject { registry: 0, subject: "t-value".into(), version: None },
        Ok(Fetched::Version(v)),
        Instant::now(),
    );
    c
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("schema");
    g.throughput(Throughput::Elements(1));
    let json_schema = Compiled::compile(Kind::JsonSchema, JSON_SCHEMA).unwrap();
    json_schema.validate(JSON).unwrap();
    g.bench_function("json_schema_validate", |b| b.iter(|| json_schema.validate(std::hint::black_box(JSON)).unwrap()));
    let mut reuse = sluice_schema::json::ReusedValue::default();
    g.bench_function("json_schema_validate_reused", |b| {
        b.iter(|| json_schema.validate_with(std::hint::black_box(JSON), Some(&mut reuse)).unwrap())
    });
    let mut reuse = sluice_schema::json::ReusedValue::default();
    g.bench_function("json_parse_reused_only", |b| b.iter(|| reuse.parse(std::hint::black_box(JSON)).is_ok()));
    let json: serde_json::Value = serde_json::from_slice(JSON).unwrap();
    g.bench_function("json_parse_only", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(std::hint::black_box(JSON)).unwrap())
    });
    let avro = AvroSchema::parse(AVRO).unwrap();
    let mut out = Vec::new();
    g.bench_function("json_to_avro_encode_only", |b| {
        b.iter(|| {
            out.clear();
            avro.encode_json(std::hint::black_box(&json), &mut out).unwrap()
        })
    });
    g.bench_function("json_to_avro_via_value", |b| {
        b.iter(|| {
            out.clear();
            let v: serde_json::Value = serde_json::from_slice(std::hint::black_box(JSON)).unwrap();
            avro.encode_json(&v, &mut out).unwrap()
        })
    });
    g.bench_function("json_to_avro_streaming", |b| {
        b.iter(|| {
            out.clear();
            avro.encode_streaming(std::hint::black_box(JSON), &mut out).unwrap()
        })
    });
    let mut cache = cache();
    let op = Outbound::Encode { registry: 0, subject: "t-value".into(), version: None };
    let now = Instant::now();
    let wire = match cache.outbound(&op, JSON, now) {
        Outcome::Replace(b) => b,
        o => panic!("{o:?}"),
    };
    g.bench_function("json_to_avro_wire", |b| b.iter(|| cache.outbound(&op, std::hint::black_box(JSON), now)));
    let dec = Inbound::Decode { registry: 0, subject: None };
    g.bench_function("avro_wire_to_json", |b| b.iter(|| cache.inbound(&dec, std::hint::black_box(&wire), now)));
    g.finish();
    eprintln!("telemetry JSON {} bytes, Avro wire {} bytes", JSON.len(), wire.len());
}

criterion_group!(benches, bench);

// Not `criterion_main!`: `schema_mimalloc.rs` calls this `main` from its own.
pub(crate) fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
