//! Avro for the bridge: a compiled schema, JSON → Avro binary written straight from the JSON
//! value (no intermediate `apache_avro::types::Value`), and Avro binary → JSON through
//! apache-avro's decoder (which applies Avro's schema-resolution rules when the reader schema
//! differs from the writer's).
//!
//! JSON as devices write it, not Avro's JSON encoding: a union takes the plain value and the
//! first branch it fits (`null` → the null branch), a missing record field takes its default,
//! `bytes`/`fixed` are strings whose chars are the bytes (Avro's own JSON convention), an enum
//! is its symbol. Avro → JSON is the inverse, so a round trip gives the JSON back.
//!
//! JSON → Avro is written while the JSON is read when it can be (no `Value` tree: most of the
//! cost of a small payload is building one); anything else goes through `serde_json::Value`,
//! so both give the same bytes, and errors always come from the `Value` path.
//!
//! Invariants: a conversion never panics on any input; an error names the JSON path of the first
//! value that does not fit (`$.pos.lat: expected double, got "north"`).

use std::collections::HashMap;
use std::fmt::Write as _;

use apache_avro::schema::{Name, RecordSchema, ResolvedSchema, Schema};
use apache_avro::types::Value as AvroValue;
use serde_json::Value as Json;

use crate::json::{Fast, Miss, Reader};
use crate::PayloadError;

/// Nesting deeper than this is refused (a hostile schema or payload cannot blow the stack).
const DEPTH_MAX: usize = 64;

/// The longest `bytes`/`string` and the most array or map items (per block) apache-avro's decoder
/// accepts from a datum. It allocates what a length prefix announces before reading it (a
/// 10-byte payload could ask for 512 MiB of bytes, or `reserve` half a billion values and abort
/// the process), so the announced size is capped: at most 1 MiB of bytes, or 1 Mi items
/// (tens of MiB of address space, untouched), per prefix. Set once for the process.
pub const DECODE_LEN_MAX: usize = 1 << 20;

fn cap_decoder_allocations() {
    apache_avro::util::max_allocation_bytes(DECODE_LEN_MAX);
}

/// A parsed Avro schema with its named types resolved, ready to encode and decode.
#[derive(Debug, Clone)]
pub struct AvroSchema {
    schema: Schema,
    names: HashMap<Name, Schema>,
    /// The schema text as given (what a registry stores).
    text: String,
}

impl AvroSchema {
    /// Parses and resolves a schema; the error is apache-avro's text.
    pub fn parse(text: &str) -> Result<AvroSchema, String> {
        cap_decoder_allocations();
        let schema = Schema::parse_str(text).map_err(|e| e.to_string())?;
        let names = {
            let resolved = ResolvedSchema::try_from(&schema).map_err(|e| e.to_string())?;
            resolved.get_names().iter().map(|(n, s)| (n.clone(), (*s).clone())).collect()
        };
        Ok(AvroSchema { schema, names, text: text.to_string() })
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Appends the Avro binary datum of `json` to `out` (nothing appended on error).
    pub fn encode_json(&self, json: &Json, out: &mut Vec<u8>) -> Result<(), PayloadError> {
        let start = out.len();
        let mut path = String::from("$");
        let r = self.encode(&self.schema, json, out, &mut path, 0);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    /// JSON text → Avro binary datum (nothing appended on error).
    ///
    /// First written while the JSON is read, without a `Value` tree ([`Self::encode_streaming`]);
    /// whatever that path does not take (invalid JSON, a value that does not fit, fields out of
    /// the schema's order, a map) is done again through `serde_json`'s `Value`, which gives the
    /// same bytes when the payload converts and the error with its path when it does not.
    pub fn encode_json_bytes(&self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), PayloadError> {
        if self.encode_streaming(payload, out).is_ok() {
            return Ok(());
        }
        let json: Json = serde_json::from_slice(payload).map_err(|e| PayloadError::NotJson(e.to_string()))?;
        self.encode_json(&json, out)
    }

    /// The streaming half of [`Self::encode_json_bytes`]: nothing appended on a miss.
    pub fn encode_streaming(&self, payload: &[u8], out: &mut Vec<u8>) -> Fast<()> {
        let start = out.len();
        let r = Reader::new(payload).and_then(|mut r| {
            self.stream(&self.schema, &mut r, out, 0)?;
            r.end()
        });
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    /// Writes the value at `r` as `schema`; on a miss `out` and `r` may hold a partial value
    /// (the caller restores both).
    fn stream(&self, schema: &Schema, r: &mut Reader<'_>, out: &mut Vec<u8>, depth: usize) -> Fast<()> {
        if depth > DEPTH_MAX {
            return Err(Miss);
        }
        let int = |r: &mut Reader<'_>| match r.peek() {
            Some(b'-' | b'0'..=b'9') => r.number()?.as_i64().ok_or(Miss),
            _ => Err(Miss),
        };
        let float = |r: &mut Reader<'_>| match r.peek() {
            Some(b'-' | b'0'..=b'9') => Ok(r.number()?.as_f64()),
            _ => Err(Miss),
        };
        match self.resolve(schema) {
            Schema::Null => r.null(),
            Schema::Boolean => {
                out.push(u8::from(r.boolean()?));
                Ok(())
            }
            Schema::Int | Schema::Date | Schema::TimeMillis => {
                let n = i32::try_from(int(r)?).map_err(|_| Miss)?;
                zigzag(i64::from(n), out);
                Ok(())
            }
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => {
                zigzag(int(r)?, out);
                Ok(())
            }
            Schema::Float => {
                out.extend_from_slice(&(float(r)? as f32).to_le_bytes());
                Ok(())
            }
            Schema::Double => {
                out.extend_from_slice(&float(r)?.to_le_bytes());
                Ok(())
            }
            Schema::String | Schema::Uuid => {
                let mut scratch = String::new();
                let s = r.string(&mut scratch)?;
                zigzag(s.len() as i64, out);
                out.extend_from_slice(s.as_bytes());
                Ok(())
            }
            Schema::Bytes => {
                let mut scratch = String::new();
                let b = latin1(r.string(&mut scratch)?).ok_or(Miss)?;
                zigzag(b.len() as i64, out);
                out.extend_from_slice(&b);
                Ok(())
            }
            Schema::Fixed(f) => {
                let mut scratch = String::new();
                let b = latin1(r.string(&mut scratch)?).filter(|b| b.len() == f.size).ok_or(Miss)?;
                out.extend_from_slice(&b);
                Ok(())
            }
            Schema::Enum(e) => {
                let mut scratch = String::new();
                let s = r.string(&mut scratch)?;
                let i = e.symbols.iter().position(|x| x == s).ok_or(Miss)?;
                zigzag(i as i64, out);
                Ok(())
            }
            Schema::Array(a) => {
                r.expect(b'[')?;
                let mut n = 0i64;
                let start = out.len();
                if !r.eat(b']') {
                    loop {
                        self.stream(&a.items, r, out, depth + 1)?;
                        n += 1;
                        if !r.eat(b',') {
                            r.expect(b']')?;
                            break;
                        }
                    }
                    // One block: its count goes before the items, known only now.
                    let mut count = Vec::with_capacity(10);
                    zigzag(n, &mut count);
                    out.splice(start..start, count);
                }
                out.push(0);
                Ok(())
            }
            Schema::Union(u) => {
                // The first branch the value fits, as the `Value` path picks it.
                let (pos, len) = (r.pos(), out.len());
                for (i, branch) in u.variants().iter().enumerate() {
                    zigzag(i as i64, out);
                    if self.stream(branch, r, out, depth + 1).is_ok() {
                        return Ok(());
                    }
                    r.rewind(pos);
                    out.truncate(len);
                }
                Err(Miss)
            }
            Schema::Record(rec) => self.stream_record(rec, r, out, depth),
            // Maps: serde_json's map order and duplicate keys decide the bytes; left to the
            // `Value` path. Decimal and the rest are not converted from JSON at all.
            _ => Err(Miss),
        }
    }

    /// A record whose JSON keys come in the schema's field order (absent fields with a default
    /// in between, unknown keys anywhere); a field out of that order or twice is a miss.
    fn stream_record(&self, rec: &RecordSchema, r: &mut Reader<'_>, out: &mut Vec<u8>, depth: usize) -> Fast<()> {
        r.expect(b'{')?;
        let mut next = 0;
        let mut scratch = String::new();
        if !r.eat(b'}') {
            loop {
                let key = r.string(&mut scratch)?;
                let field = match rec.fields.get(next) {
                    Some(f) if f.name == key => Some(next),
                    _ => rec.lookup.get(key).copied().filter(|&i| rec.fields.get(i).is_some_and(|f| f.name == key)),
                };
                r.expect(b':')?;
                match field {
                    Some(i) if i >= next => {
                        for f in &rec.fields[next..i] {
                            self.stream_default(f, out, depth)?;
                        }
                        self.stream(&rec.fields[i].schema, r, out, depth + 1)?;
                        next = i + 1;
                    }
                    Some(_) => return Err(Miss),
                    None => r.skip(depth + 1)?,
                }
                if !r.eat(b',') {
                    r.expect(b'}')?;
                    break;
                }
            }
        }
        for f in rec.fields.get(next..).unwrap_or(&[]) {
            self.stream_default(f, out, depth)?;
        }
        Ok(())
    }

    /// An absent field: its default, as the `Value` path writes it.
    fn stream_default(&self, f: &apache_avro::schema::RecordField, out: &mut Vec<u8>, depth: usize) -> Fast<()> {
        let d = f.default.as_ref().ok_or(Miss)?;
        self.encode(&f.schema, d, out, &mut String::new(), depth + 1).map_err(|_| Miss)
    }

    /// Checks that `datum` is exactly one Avro datum of this schema (no bytes left over).
    pub fn validate_datum(&self, datum: &[u8]) -> Result<(), PayloadError> {
        self.decode_value(datum, None).map(|_| ())
    }

    /// Decodes a datum written with this schema, resolved to `reader` (Avro's rules) if given.
    pub fn decode_value(&self, datum: &[u8], reader: Option<&AvroSchema>) -> Result<AvroValue, PayloadError> {
        let mut rest = datum;
        let v = apache_avro::from_avro_datum(&self.schema, &mut rest, reader.map(|r| &r.schema))
            .map_err(|e| PayloadError::Avro(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PayloadError::Avro(format!("{} bytes left after the datum", rest.len())));
        }
        Ok(v)
    }

    /// Avro binary datum (written with this schema) → JSON text, resolved to `reader` if given.
    pub fn decode_to_json(&self, datum: &[u8], reader: Option<&AvroSchema>) -> Result<Vec<u8>, PayloadError> {
        let v = self.decode_value(datum, reader)?;
        let json = avro_to_json(v)?;
        serde_json::to_vec(&json).map_err(|e| PayloadError::Avro(e.to_string()))
    }

    fn resolve<'a>(&'a self, s: &'a Schema) -> &'a Schema {
        match s {
            Schema::Ref { name } => self.names.get(name).unwrap_or(s),
            _ => s,
        }
    }

    fn encode(
        &self,
        schema: &Schema,
        v: &Json,
        out: &mut Vec<u8>,
        path: &mut String,
        depth: usize,
    ) -> Result<(), PayloadError> {
        if depth > DEPTH_MAX {
            return Err(PayloadError::Convert {
                path: path.clone(),
                problem: format!("nested deeper than {DEPTH_MAX}"),
            });
        }
        let schema = self.resolve(schema);
        let mismatch = |path: &str, want: &str| PayloadError::Convert {
            path: path.to_string(),
            problem: format!("expected {want}, got {}", describe(v)),
        };
        match schema {
            Schema::Null => match v {
                Json::Null => Ok(()),
                _ => Err(mismatch(path, "null")),
            },
            Schema::Boolean => match v {
                Json::Bool(b) => {
                    out.push(u8::from(*b));
                    Ok(())
                }
                _ => Err(mismatch(path, "boolean")),
            },
            Schema::Int | Schema::Date | Schema::TimeMillis => {
                let n = v.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or_else(|| mismatch(path, "int"))?;
                zigzag(i64::from(n), out);
                Ok(())
            }
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => {
                let n = v.as_i64().ok_or_else(|| mismatch(path, "long"))?;
                zigzag(n, out);
                Ok(())
            }
            Schema::Float => {
                let n = v.as_f64().ok_or_else(|| mismatch(path, "float"))?;
                out.extend_from_slice(&(n as f32).to_le_bytes());
                Ok(())
            }
            Schema::Double => {
                let n = v.as_f64().ok_or_else(|| mismatch(path, "double"))?;
                out.extend_from_slice(&n.to_le_bytes());
                Ok(())
            }
            Schema::String | Schema::Uuid => {
                let s = v.as_str().ok_or_else(|| mismatch(path, "string"))?;
                zigzag(s.len() as i64, out);
                out.extend_from_slice(s.as_bytes());
                Ok(())
            }
            Schema::Bytes => {
                let s = v.as_str().ok_or_else(|| mismatch(path, "bytes (a string)"))?;
                let b = latin1(s).ok_or_else(|| mismatch(path, "bytes (chars U+0000..U+00FF)"))?;
                zigzag(b.len() as i64, out);
                out.extend_from_slice(&b);
                Ok(())
            }
            Schema::Fixed(f) => {
                let s = v.as_str().ok_or_else(|| mismatch(path, "fixed (a string)"))?;
                let b = latin1(s).filter(|b| b.len() == f.size);
                let b = b.ok_or_else(|| mismatch(path, &format!("fixed of {} bytes", f.size)))?;
                out.extend_from_slice(&b);
                Ok(())
            }
            Schema::Enum(e) => {
                let s = v.as_str().ok_or_else(|| mismatch(path, "enum symbol"))?;
                let i = e.symbols.iter().position(|x| x == s).ok_or_else(|| PayloadError::Convert {
                    path: path.clone(),
                    problem: format!("`{s}` is not one of the symbols {:?}", e.symbols),
                })?;
                zigzag(i as i64, out);
                Ok(())
            }
            Schema::Array(a) => {
                let items = v.as_array().ok_or_else(|| mismatch(path, "array"))?;
                if !items.is_empty() {
                    zigzag(items.len() as i64, out);
                    let len = path.len();
                    for (i, item) in items.iter().enumerate() {
                        let _ = write!(path, "[{i}]");
                        self.encode(&a.items, item, out, path, depth + 1)?;
                        path.truncate(len);
                    }
                }
                out.push(0);
                Ok(())
            }
            Schema::Map(m) => {
                let entries = v.as_object().ok_or_else(|| mismatch(path, "map (an object)"))?;
                if !entries.is_empty() {
                    zigzag(entries.len() as i64, out);
                    let len = path.len();
                    for (k, item) in entries {
                        zigzag(k.len() as i64, out);
                        out.extend_from_slice(k.as_bytes());
                        let _ = write!(path, ".{k}");
                        self.encode(&m.types, item, out, path, depth + 1)?;
                        path.truncate(len);
                    }
                }
                out.push(0);
                Ok(())
            }
            Schema::Union(u) => {
                // The first branch the value fits; a failed try leaves nothing behind. Of the
                // failures, the one that got deepest into the value is the one worth reporting.
                let (start, plen) = (out.len(), path.len());
                let mut best: Option<PayloadError> = None;
                for (i, branch) in u.variants().iter().enumerate() {
                    zigzag(i as i64, out);
                    match self.encode(branch, v, out, path, depth + 1) {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            out.truncate(start);
                            path.truncate(plen);
                            let deeper = |e: &PayloadError| match e {
                                PayloadError::Convert { path: p, .. } => p.len() > plen,
                                _ => false,
                            };
                            if deeper(&e) && !best.as_ref().is_some_and(deeper) {
                                best = Some(e);
                            }
                        }
                    }
                }
                Err(best.unwrap_or_else(|| PayloadError::Convert {
                    path: path.clone(),
                    problem: format!("{} fits no branch of the union", describe(v)),
                }))
            }
            Schema::Record(r) => self.encode_record(r, v, out, path, depth),
            Schema::Decimal(_) | Schema::BigDecimal | Schema::Duration | Schema::Ref { .. } => {
                Err(PayloadError::Convert {
                    path: path.clone(),
                    problem: "this Avro type (decimal, duration) is not converted from JSON".into(),
                })
            }
        }
    }

    fn encode_record(
        &self,
        r: &RecordSchema,
        v: &Json,
        out: &mut Vec<u8>,
        path: &mut String,
        depth: usize,
    ) -> Result<(), PayloadError> {
        let obj = v.as_object().ok_or_else(|| PayloadError::Convert {
            path: path.clone(),
            problem: format!("expected record {}, got {}", r.name.name, describe(v)),
        })?;
        let len = path.len();
        for f in &r.fields {
            let _ = write!(path, ".{}", f.name);
            let value = match (obj.get(&f.name), &f.default) {
                (Some(x), _) => x,
                (None, Some(d)) => d,
                (None, None) => {
                    return Err(PayloadError::Convert { path: path.clone(), problem: "required field missing".into() })
                }
            };
            self.encode(&f.schema, value, out, path, depth + 1)?;
            path.truncate(len);
        }
        Ok(())
    }
}

/// Avro's zig-zag varint of a long.
fn zigzag(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[cfg(test)]
pub(crate) fn tests_zigzag(n: i64, out: &mut Vec<u8>) {
    zigzag(n, out)
}

/// A string whose chars are bytes (Avro's JSON convention for bytes and fixed).
fn latin1(s: &str) -> Option<Vec<u8>> {
    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect()
}

fn describe(v: &Json) -> String {
    let mut s = match v {
        Json::Null => "null".to_string(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => n.to_string(),
        Json::String(s) => format!("{s:?}"),
        Json::Array(_) => "an array".to_string(),
        Json::Object(_) => "an object".to_string(),
    };
    if s.len() > 40 {
        let mut end = 40;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// An Avro value as the plain JSON a device reads (unions unwrapped, enums as symbols).
pub fn avro_to_json(v: AvroValue) -> Result<Json, PayloadError> {
    use serde_json::Number;
    let float = |f: f64| Number::from_f64(f).map_or(Json::Null, Json::Number);
    Ok(match v {
        AvroValue::Null => Json::Null,
        AvroValue::Boolean(b) => Json::Bool(b),
        AvroValue::Int(n) | AvroValue::Date(n) | AvroValue::TimeMillis(n) => Json::from(n),
        AvroValue::Long(n)
        | AvroValue::TimeMicros(n)
        | AvroValue::TimestampMillis(n)
        | AvroValue::TimestampMicros(n)
        | AvroValue::TimestampNanos(n)
        | AvroValue::LocalTimestampMillis(n)
        | AvroValue::LocalTimestampMicros(n)
        | AvroValue::LocalTimestampNanos(n) => Json::from(n),
        AvroValue::Float(f) => float(f64::from(f)),
        AvroValue::Double(f) => float(f),
        AvroValue::Bytes(b) | AvroValue::Fixed(_, b) => Json::String(b.iter().map(|&c| char::from(c)).collect()),
        AvroValue::String(s) | AvroValue::Enum(_, s) => Json::String(s),
        AvroValue::Uuid(u) => Json::String(u.to_string()),
        AvroValue::Union(_, inner) => avro_to_json(*inner)?,
        AvroValue::Array(items) => Json::Array(items.into_iter().map(avro_to_json).collect::<Result<_, _>>()?),
        AvroValue::Map(m) => {
            let mut o = serde_json::Map::new();
            for (k, v) in m {
                o.insert(k, avro_to_json(v)?);
            }
            Json::Object(o)
        }
        AvroValue::Record(fields) => {
            let mut o = serde_json::Map::new();
            for (k, v) in fields {
                o.insert(k, avro_to_json(v)?);
            }
            Json::Object(o)
        }
        other => return Err(PayloadError::Avro(format!("{other:?} is not converted to JSON"))),
    })
}
