//! Every conversion and every error of the crate, without a registry server (registry answers are
//! fed to the cache as a fetch would).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::avro::AvroSchema;
use crate::check::{Cache, Fetched, Inbound, Need, Outbound, Outcome, Schemas};
use crate::local::{Compiled, Kind, LocalSchemas};
use crate::registry::{RegistryClient, RegistryError, RegistrySettings, SubjectVersion};
use crate::{wire, PayloadError};

const TELEMETRY: &str = r#"{"type":"record","name":"Telemetry","namespace":"iot","fields":[
  {"name":"device","type":"string"},
  {"name":"ts","type":"long"},
  {"name":"temp","type":"double"},
  {"name":"ok","type":"boolean"},
  {"name":"tags","type":{"type":"array","items":"string"}},
  {"name":"extra","type":["null","string"],"default":null},
  {"name":"level","type":{"type":"enum","name":"Level","symbols":["LOW","HIGH"]},"default":"LOW"},
  {"name":"attrs","type":{"type":"map","values":"int"},"default":{}},
  {"name":"raw","type":"bytes","default":""},
  {"name":"pos","type":["null",{"type":"record","name":"Pos","fields":[{"name":"lat","type":"double"},{"name":"lon","type":"double"}]}],"default":null},
  {"name":"prev","type":["null","Pos"],"default":null}
]}"#;

fn telemetry() -> AvroSchema {
    AvroSchema::parse(TELEMETRY).unwrap()
}

fn sample() -> serde_json::Value {
    json!({"device":"car-1","ts":1700000000000i64,"temp":21.5,"ok":true,"tags":["a","b"],
           "extra":"x","level":"HIGH","attrs":{"k":3},"raw":"\u{0}\u{ff}",
           "pos":{"lat":1.5,"lon":-2.0},"prev":{"lat":0.0,"lon":0.0}})
}

#[test]
fn json_to_avro_and_back_is_the_same_json_and_matches_apache_avro() {
    let s = telemetry();
    let mut out = Vec::new();
    s.encode_json(&sample(), &mut out).unwrap();
    // apache-avro's own decoder reads what we wrote, and our JSON comes back.
    let back: serde_json::Value = serde_json::from_slice(&s.decode_to_json(&out, None).unwrap()).unwrap();
    assert_eq!(back, sample());
    // And apache-avro's own encoder writes the same bytes for the same value.
    let v = apache_avro::from_avro_datum(s.schema(), &mut &out[..], None).unwrap();
    assert_eq!(apache_avro::to_avro_datum(s.schema(), v).unwrap(), out);
}

#[test]
fn missing_fields_take_their_defaults_and_required_ones_are_named() {
    let s = telemetry();
    let mut out = Vec::new();
    s.encode_json(&json!({"device":"d","ts":1,"temp":0,"ok":false,"tags":[]}), &mut out).unwrap();
    let back: serde_json::Value = serde_json::from_slice(&s.decode_to_json(&out, None).unwrap()).unwrap();
    assert_eq!(back["extra"], json!(null));
    assert_eq!(back["level"], json!("LOW"));
    assert_eq!(back["temp"], json!(0.0));
    let mut out = Vec::new();
    let e = s.encode_json(&json!({"device":"d","temp":0,"ok":false,"tags":[]}), &mut out).unwrap_err();
    assert_eq!(e.to_string(), "$.ts: required field missing");
    assert!(out.is_empty(), "nothing written on error");
}

#[test]
fn wrong_types_name_the_path_and_what_was_expected() {
    let s = telemetry();
    let cases = [
        (json!({"temp":"hot"}), "$.temp: expected double, got \"hot\""),
        (json!({"ts":1.5}), "$.ts: expected long, got 1.5"),
        (json!({"tags":["a",3]}), "$.tags[1]: expected string, got 3"),
        (json!({"level":"MID"}), "$.level: `MID` is not one of the symbols [\"LOW\", \"HIGH\"]"),
        (json!({"attrs":{"k":"v"}}), "$.attrs.k: expected int, got \"v\""),
        (json!({"pos":{"lat":1}}), "$.pos.lon: required field missing"),
        (json!({"extra":5}), "$.extra: 5 fits no branch of the union"),
        (json!({"raw":"\u{100}"}), "$.raw: expected bytes (chars U+0000..U+00FF), got \"Ā\""),
        (json!({"ok":"yes"}), "$.ok: expected boolean, got \"yes\""),
    ];
    for (patch, want) in cases {
        let mut v = sample();
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        let e = s.encode_json(&v, &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), want);
    }
    let e = s.encode_json(&json!([1]), &mut Vec::new()).unwrap_err();
    assert_eq!(e.to_string(), "$: expected record Telemetry, got an array");
    let e = s.encode_json_bytes(b"{not json", &mut Vec::new()).unwrap_err();
    assert!(matches!(e, PayloadError::NotJson(_)), "{e}");
    let int = AvroSchema::parse(r#""int""#).unwrap();
    assert_eq!(
        int.encode_json(&json!(1i64 << 40), &mut Vec::new()).unwrap_err().to_string(),
        "$: expected int, got 1099511627776"
    );
}

#[test]
fn primitives_fixed_and_floats_encode_as_avro_says() {
    let enc = |schema: &str, v: serde_json::Value| {
        let mut out = Vec::new();
        AvroSchema::parse(schema).unwrap().encode_json(&v, &mut out).unwrap();
        out
    };
    assert_eq!(enc(r#""long""#, json!(-1)), [1]);
    assert_eq!(enc(r#""long""#, json!(64)), [0x80, 1]);
    assert_eq!(enc(r#""string""#, json!("hi")), [4, b'h', b'i']);
    assert_eq!(enc(r#""float""#, json!(1.0)), 1.0f32.to_le_bytes());
    assert_eq!(enc(r#"{"type":"fixed","name":"F","size":2}"#, json!("ab")), *b"ab");
    assert_eq!(enc(r#"["null","long"]"#, json!(null)), [0]);
    assert_eq!(enc(r#"["null","long"]"#, json!(1)), [2, 2]);
    let fixed = AvroSchema::parse(r#"{"type":"fixed","name":"F","size":2}"#).unwrap();
    assert_eq!(
        fixed.encode_json(&json!("abc"), &mut Vec::new()).unwrap_err().to_string(),
        "$: expected fixed of 2 bytes, got \"abc\""
    );
    let nan = AvroSchema::parse(r#""double""#).unwrap();
    assert_eq!(nan.decode_to_json(&f64::NAN.to_le_bytes(), None).unwrap(), b"null");
}

#[test]
fn truncated_and_trailing_datums_are_not_datums() {
    let s = telemetry();
    let mut out = Vec::new();
    s.encode_json(&sample(), &mut out).unwrap();
    for cut in [0, 1, out.len() / 2, out.len() - 1] {
        let e = s.validate_datum(&out[..cut]).unwrap_err();
        assert!(matches!(e, PayloadError::Avro(_)), "cut {cut}: {e}");
    }
    out.push(0);
    assert_eq!(
        s.validate_datum(&out).unwrap_err().to_string(),
        "not an Avro datum of the schema: 1 bytes left after the datum"
    );
}

#[test]
fn a_hostile_nesting_depth_is_refused_not_a_stack_overflow() {
    let s = AvroSchema::parse(r#"{"type":"record","name":"N","fields":[{"name":"n","type":["null","N"]}]}"#).unwrap();
    let mut v = json!({"n": null});
    for _ in 0..200 {
        v = json!({ "n": v });
    }
    let e = s.encode_json(&v, &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("nested deeper than 64"), "{e}");
}

#[test]
fn older_writer_data_reads_with_a_newer_reader_schema() {
    let v1 = AvroSchema::parse(r#"{"type":"record","name":"T","fields":[{"name":"a","type":"int"}]}"#).unwrap();
    let v2 = AvroSchema::parse(
        r#"{"type":"record","name":"T","fields":[{"name":"a","type":"int"},{"name":"b","type":"string","default":"none"}]}"#,
    )
    .unwrap();
    let mut d = Vec::new();
    v1.encode_json(&json!({"a": 7}), &mut d).unwrap();
    assert_eq!(v1.decode_to_json(&d, Some(&v2)).unwrap(), br#"{"a":7,"b":"none"}"#);
}

#[test]
fn local_json_schema_validates_every_draft_and_names_the_first_error() {
    for draft in ["http://json-schema.org/draft-04/schema#", "https://json-schema.org/draft/2020-12/schema"] {
        let text = format!(
            r#"{{"$schema":"{draft}","type":"object","required":["device","temp"],
                 "properties":{{"device":{{"type":"string"}},"temp":{{"type":"number"}}}}}}"#
        );
        let c = Compiled::compile(Kind::JsonSchema, &text).unwrap();
        c.validate(br#"{"device":"d","temp":1.5}"#).unwrap();
        let e = c.validate(br#"{"device":"d"}"#).unwrap_err();
        assert_eq!(e.to_string(), "\"temp\" is a required property (at ``)");
        let e = c.validate(br#"{"device":"d","temp":"hot"}"#).unwrap_err();
        assert_eq!(e.to_string(), "\"hot\" is not of type \"number\" (at `/temp`)");
        assert!(matches!(c.validate(b"{").unwrap_err(), PayloadError::NotJson(_)));
    }
    let e = Compiled::compile(Kind::JsonSchema, r#"{"type": 12}"#).unwrap_err();
    assert!(e.contains("12"), "{e}");
    assert!(Compiled::compile(Kind::JsonSchema, "not json").unwrap_err().starts_with("not JSON"));
    assert!(Compiled::compile(Kind::Avro, r#"{"type":"nope"}"#).is_err());
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-schema-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_reload_keeps_a_schema_that_no_longer_compiles_and_names_its_file() {
    let dir = temp_dir("reload");
    let (a, b) = (dir.join("a.json"), dir.join("b.avsc"));
    std::fs::write(&a, r#"{"type":"object","required":["x"]}"#).unwrap();
    std::fs::write(&b, r#""int""#).unwrap();
    let entries = vec![
        ("a".to_string(), Kind::JsonSchema, a.display().to_string()),
        ("b".to_string(), Kind::Avro, b.display().to_string()),
    ];
    let local = LocalSchemas::load(&entries).unwrap();
    let g = local.generation();
    std::fs::write(&a, r#"{"type":"object","required":["y"]}"#).unwrap();
    std::fs::write(&b, "{broken").unwrap();
    let failed = local.reload();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].name, "b");
    assert!(failed[0].to_string().starts_with(&format!("schema `b` (file {}): ", b.display())), "{}", failed[0]);
    assert!(local.generation() > g);
    local.get("a").unwrap().validate(br#"{"y":1}"#).unwrap();
    local.get("b").unwrap().validate(&[2]).unwrap(); // still "int"
    std::fs::remove_file(&a).unwrap();
    let e = LocalSchemas::load(&entries).unwrap_err();
    assert_eq!(e.file, a.display().to_string());
    assert!(e.problem.contains("No such file"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn cache_with(local: LocalSchemas) -> Cache {
    let client = RegistryClient::new(
        "reg",
        &RegistrySettings { url: "http://127.0.0.1:9".into(), timeout_ms: 100, ..Default::default() },
    )
    .unwrap();
    Cache::new(Arc::new(Schemas { local: Arc::new(local), registries: vec![(client, Duration::from_secs(30))] }))
}

#[test]
fn encode_waits_for_the_subject_then_writes_the_wire_format() {
    let mut c = cache_with(LocalSchemas::load(&[]).unwrap());
    let now = Instant::now();
    let op = Outbound::Encode { registry: 0, subject: "t-value".into(), version: None };
    let payload = serde_json::to_vec(&sample()).unwrap();
    let need = match c.outbound(&op, &payload, now) {
        Outcome::Wait(n) => n,
        o => panic!("{o:?}"),
    };
    assert_eq!(need, Need::Subject { registry: 0, subject: "t-value".into(), version: None });
    assert!(c.begin_fetch(&need));
    assert!(!c.begin_fetch(&need), "one fetch per need");
    let v = SubjectVersion { id: 42, version: 1, schema: Arc::new(telemetry()) };
    c.store(need.clone(), Ok(Fetched::Version(v)), now);
    let Outcome::Replace(bytes) = c.outbound(&op, &payload, now) else { panic!() };
    assert_eq!(wire::split(&bytes).unwrap().0, 42);
    // Decode of what encode wrote needs no fetch: the subject's id is cached too.
    let dec = Inbound::Decode { registry: 0, subject: None };
    let Outcome::Replace(json) = c.inbound(&dec, &bytes, now) else { panic!() };
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&json).unwrap(), sample());
    // A stale subject is refreshed in the background while the cached one serves.
    let later = now + Duration::from_secs(31);
    assert!(matches!(c.outbound(&op, &payload, later), Outcome::Replace(_)));
    assert_eq!(c.take_refreshes(), vec![need.clone()]);
    // An outage: the failed refresh keeps the cached schema.
    let down = RegistryError::Unreachable { registry: "reg".into(), url: "u".into(), error: "refused".into() };
    c.store(need, Err(down), later);
    assert!(matches!(c.outbound(&op, &payload, later), Outcome::Replace(_)));
    // Bad JSON is the payload's fault, named with the subject.
    match c.outbound(&op, br#"{"device":1}"#, later) {
        Outcome::Invalid { schema, error } => {
            assert_eq!(schema, "subject `t-value` (registry `reg`)");
            assert_eq!(error.to_string(), "$.device: expected string, got 1");
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn validate_checks_magic_subject_and_datum_and_unknown_ids_fail_cleanly() {
    let mut c = cache_with(LocalSchemas::load(&[]).unwrap());
    let now = Instant::now();
    let op = Outbound::Validate { registry: 0, subject: "t-value".into() };
    let mut good = Vec::new();
    wire::write_header(7, &mut good);
    telemetry().encode_json(&sample(), &mut good).unwrap();
    let invalid = |o: Outcome| match o {
        Outcome::Invalid { error, .. } => error.to_string(),
        o => panic!("{o:?}"),
    };
    assert!(invalid(c.outbound(&op, b"{}", now)).starts_with("not the Confluent wire format"));
    let Outcome::Wait(n) = c.outbound(&op, &good, now) else { panic!() };
    assert_eq!(n, Need::SubjectsOf { registry: 0, id: 7 });
    c.store(n, Ok(Fetched::Subjects(vec!["t-value".into()])), now);
    let Outcome::Wait(n) = c.outbound(&op, &good, now) else { panic!() };
    assert_eq!(n, Need::Id { registry: 0, id: 7 });
    c.store(n, Ok(Fetched::Schema(Arc::new(telemetry()))), now);
    assert!(matches!(c.outbound(&op, &good, now), Outcome::Pass));
    assert!(invalid(c.outbound(&op, &good[..good.len() - 3], now)).starts_with("not an Avro datum"));
    // An id of another subject, and one the registry does not know.
    let mut other = good.clone();
    other[4] = 8;
    let Outcome::Wait(n) = c.outbound(&op, &other, now) else { panic!() };
    c.store(n, Ok(Fetched::Subjects(vec!["else".into()])), now);
    assert_eq!(invalid(c.outbound(&op, &other, now)), "schema id 8 is not a version of subject `t-value`");
    other[4] = 9;
    let Outcome::Wait(n) = c.outbound(&op, &other, now) else { panic!() };
    c.store(n, Err(RegistryError::NotFound { registry: "reg".into(), what: "x".into() }), now);
    assert_eq!(invalid(c.outbound(&op, &other, now)), "schema id 9 is not a version of subject `t-value`");
    // Unreachable: a bridge error for a second, then tried again.
    other[4] = 10;
    let Outcome::Wait(n) = c.outbound(&op, &other, now) else { panic!() };
    let down = RegistryError::Unreachable { registry: "reg".into(), url: "u".into(), error: "refused".into() };
    c.store(n, Err(down), now);
    assert!(matches!(c.outbound(&op, &other, now), Outcome::Failed(RegistryError::Unreachable { .. })));
    assert!(matches!(c.outbound(&op, &other, now + Duration::from_secs(2)), Outcome::Wait(_)));
}

#[test]
fn fetches_are_bounded_and_a_payload_beyond_fails_at_once() {
    let mut c = cache_with(LocalSchemas::load(&[]).unwrap());
    let dec = Inbound::Decode { registry: 0, subject: None };
    let now = Instant::now();
    for id in 0..crate::check::FETCHES_MAX as u32 {
        let mut p = Vec::new();
        wire::write_header(id, &mut p);
        let Outcome::Wait(n) = c.inbound(&dec, &p, now) else { panic!() };
        assert!(c.begin_fetch(&n));
    }
    let mut p = Vec::new();
    wire::write_header(999, &mut p);
    assert!(matches!(c.inbound(&dec, &p, now), Outcome::Failed(RegistryError::Busy { .. })));
}

#[test]
fn local_validation_picks_up_a_reload() {
    let dir = temp_dir("cache-reload");
    let f = dir.join("s.json");
    std::fs::write(&f, r#"{"required":["a"]}"#).unwrap();
    let local = LocalSchemas::load(&[("s".into(), Kind::JsonSchema, f.display().to_string())]).unwrap();
    let mut c = cache_with(local);
    let op = Outbound::Local("s".into());
    let now = Instant::now();
    assert!(matches!(c.outbound(&op, br#"{"a":1}"#, now), Outcome::Pass));
    std::fs::write(&f, r#"{"required":["b"]}"#).unwrap();
    assert!(c.schemas().local.reload().is_empty());
    assert!(matches!(c.outbound(&op, br#"{"a":1}"#, now), Outcome::Invalid { .. }));
    assert!(matches!(c.outbound(&op, br#"{"b":1}"#, now), Outcome::Pass));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn decode_reads_with_the_subjects_refreshed_version() {
    let mut c = cache_with(LocalSchemas::load(&[]).unwrap());
    let now = Instant::now();
    let v1 =
        AvroSchema::parse(r#"{"type":"record","name":"T","namespace":"iot","fields":[{"name":"a","type":"int"}]}"#)
            .unwrap();
    let v2 = AvroSchema::parse(
        r#"{"type":"record","name":"T","namespace":"iot","fields":[{"name":"a","type":"int"},{"name":"b","type":"string","default":"none"}]}"#,
    )
    .unwrap();
    let subject = Need::Subject { registry: 0, subject: "s".into(), version: None };
    c.store(
        subject.clone(),
        Ok(Fetched::Version(SubjectVersion { id: 1, version: 1, schema: Arc::new(v1.clone()) })),
        now,
    );
    let mut d = Vec::new();
    wire::write_header(1, &mut d);
    v1.encode_json(&json!({"a": 7}), &mut d).unwrap();
    let op = Inbound::Decode { registry: 0, subject: Some("s".into()) };
    let Outcome::Replace(j) = c.inbound(&op, &d, now) else { panic!() };
    assert_eq!(j, br#"{"a":7}"#);
    let later = now + Duration::from_secs(31);
    let _ = c.inbound(&op, &d, later);
    let due = c.take_refreshes();
    assert_eq!(due, vec![subject.clone()]);
    assert!(c.begin_fetch(&subject));
    c.store(subject, Ok(Fetched::Version(SubjectVersion { id: 2, version: 2, schema: Arc::new(v2) })), later);
    let Outcome::Replace(j) = c.inbound(&op, &d, later) else { panic!() };
    assert_eq!(j, br#"{"a":7,"b":"none"}"#);
}

#[test]
fn a_length_prefix_cannot_make_the_decoder_allocate_what_it_announces() {
    let bytes = AvroSchema::parse(r#""bytes""#).unwrap();
    let arr = AvroSchema::parse(r#"{"type":"array","items":"long"}"#).unwrap();
    // zig-zag varints announcing 10^8 bytes and 10^9 items, then nothing.
    let mut big = Vec::new();
    super::avro::tests_zigzag(100_000_000, &mut big);
    let e = bytes.validate_datum(&big).unwrap_err().to_string();
    assert!(e.contains("1048576"), "refused by the cap, not after allocating: {e}");
    let mut many = Vec::new();
    super::avro::tests_zigzag(400_000_000, &mut many); // under apache-avro's own 512 Mi cap: reserve() of ~20 GiB
    let e = arr.validate_datum(&many).unwrap_err().to_string();
    assert!(e.contains("1048576"), "{e}");
    // Within the cap, a short datum is just truncated.
    let mut short = Vec::new();
    super::avro::tests_zigzag(1000, &mut short);
    assert!(bytes.validate_datum(&short).is_err());
}

/// Payloads in the schema's field order (the streaming encoder's path) and others (the `Value`
/// path): `encode_json_bytes` gives exactly what the `Value` path gives, bytes or error.
#[test]
fn streaming_json_to_avro_equals_the_value_path() {
    let s = telemetry();
    let streamed = [
        r#"{"device":"car-1","ts":1700000000000,"temp":21.5,"ok":true,"tags":["a","b"],"extra":"x","level":"HIGH","raw":"\u0000\u00ff","pos":{"lat":1.5,"lon":-2.0},"prev":{"lat":0.0,"lon":0.0}}"#,
        r#"{"device":"d","ts":-1,"temp":0,"ok":false,"tags":[]}"#,
        r#" { "junk" : [ {"x":[1,2,{"y":null}]}, "s" ] , "device" : "d\"\u00e9😀" , "ts" : 1 , "temp" : 1e3 , "ok" : false , "tags" : [ "a" ] , "pos" : null , "more" : {} } "#,
        r#"{"device":"d","ts":1,"temp":2,"ok":true,"tags":["x"],"level":"LOW","pos":{"lat":2,"lon":1,"z":3}}"#,
    ];
    for p in streamed {
        let mut fast = vec![7];
        s.encode_streaming(p.as_bytes(), &mut fast).unwrap_or_else(|_| panic!("streaming missed {p}"));
        let mut slow = vec![7];
        s.encode_json(&serde_json::from_str(p).unwrap(), &mut slow).unwrap();
        assert_eq!(fast, slow, "{p}");
    }
    let mut others: Vec<Vec<u8>> = [
        // Out of the schema's order, a field twice, a map: the `Value` path.
        r#"{"ts":1,"device":"d","temp":0,"ok":false,"tags":[]}"#,
        r#"{"device":"d","ts":1,"temp":2,"ok":true,"tags":["x"],"pos":{"lon":1,"lat":2}}"#,
        r#"{"device":"d","device":"e","ts":1,"temp":0,"ok":false,"tags":[]}"#,
        r#"{"device":"d","ts":1,"temp":0,"ok":false,"tags":[],"attrs":{"b":2,"a":1}}"#,
        // Errors: each the `Value` path's, with its JSON path.
        r#"{"device":"d","ts":1.5,"temp":0,"ok":false,"tags":[]}"#,
        r#"{"device":"d","ts":1,"temp":"hot","ok":false,"tags":[]}"#,
        r#"{"device":"d","ts":1,"temp":1e400,"ok":false,"tags":[]}"#,
        r#"{"device":"d","ts":99999999999999999999,"temp":0,"ok":false,"tags":[]}"#,
        r#"{"device":"d","ts":1,"temp":0,"ok":false}"#,
        r#"{"device":"d","ts":1,"temp":0,"ok":false,"tags":[1]}"#,
        r#"{"device":"d","ts":1,"temp":0,"ok":false,"tags":[],"extra":5}"#,
        r#"{"device":"d","ts":1,"temp":0,"ok":false,"tags":[],"pos":{"lat":1}}"#,
        r#"{"device":"d","ts":1,"temp":0,"ok":false,"tags":[],"level":"MID"}"#,
        r#"{"device":"d","ts":1,"temp":0,"ok":false,"tags":[],"raw":"\u0100"}"#,
        r#"[1]"#,
        r#"{"device":"d","ts":1,"temp":0,"ok":false,"tags":[],}"#,
        "",
    ]
    .iter()
    .map(|p| p.as_bytes().to_vec())
    .collect();
    let good = streamed[0].as_bytes();
    others.extend((0..good.len()).map(|n| good[..n].to_vec()));
    others.push(b"{\"device\":\"\xff\",\"ts\":1,\"temp\":0,\"ok\":false,\"tags\":[]}".to_vec());
    let deep = format!("{{\"junk\":{}1{}}}", "[".repeat(200), "]".repeat(200));
    others.push(deep.into_bytes());
    let deep = format!("{{\"junk\":{}", "[".repeat(1_000_000));
    others.push(deep.into_bytes());
    for p in &others {
        let shown = String::from_utf8_lossy(&p[..p.len().min(80)]).into_owned();
        let slow = match serde_json::from_slice::<serde_json::Value>(p) {
            Ok(v) => {
                let mut out = Vec::new();
                s.encode_json(&v, &mut out).map(|()| out)
            }
            Err(e) => Err(PayloadError::NotJson(e.to_string())),
        };
        let mut out = Vec::new();
        let got = s.encode_json_bytes(p, &mut out).map(|()| out);
        assert_eq!(got, slow, "{shown}");
    }
}
