//! A strict JSON reader over one payload, for the fast paths: JSON → Avro written while the
//! JSON is read ([`crate::avro`]) and a JSON value parsed into the previous payload's value, its
//! strings and maps reused ([`ReusedValue`]).
//!
//! It reads exactly the JSON that `serde_json` reads (RFC 8259: no comments, no trailing commas,
//! no leading zeros, no control characters in strings, valid UTF-8, paired surrogates, at most
//! 127 nested arrays and objects) but it gives no error text: anything it does not take is a
//! [`Miss`], and the caller then runs the `serde_json` path, which says what is wrong. So an
//! error message never depends on which path found it, and the fast path only has to be right
//! when it succeeds.
//!
//! # Invariants
//! - Never panics, whatever the bytes; nesting is bounded by [`DEPTH_MAX`] (serde_json's
//!   recursion limit), so no input can blow the stack.
//! - Numbers are read as `serde_json` reads them (`as_i64`, `as_f64` of its `Number`): an integer
//!   token is an integer only in `i64`/`u64` range and not `-0`; a number that is infinite as a
//!   double is a miss (serde_json refuses it). A double is correctly rounded (the standard
//!   library's parser, or Clinger's exact fast path for short ones); serde_json without its
//!   `float_roundtrip` feature can be one bit off beyond that fast path, so the two paths may
//!   differ there by that bit, ours being the exact one.

use serde_json::{Map, Number, Value};

/// Arrays and objects open at once from which a payload is refused (serde_json's recursion
/// limit: 127 nested are read, 128 are not).
pub const DEPTH_MAX: usize = 128;

/// Not taken by the fast path (invalid JSON, or not what the caller wanted): use the slow path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Miss;

pub type Fast<T> = Result<T, Miss>;

/// A number token as `serde_json` would hold it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    Pos(u64),
    Neg(i64),
    Float(f64),
}

impl Num {
    /// `serde_json::Number::as_i64`.
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Num::Pos(n) => i64::try_from(n).ok(),
            Num::Neg(n) => Some(n),
            Num::Float(_) => None,
        }
    }

    /// `serde_json::Number::as_f64`.
    pub fn as_f64(self) -> f64 {
        match self {
            Num::Pos(n) => n as f64,
            Num::Neg(n) => n as f64,
            Num::Float(f) => f,
        }
    }

    fn to_number(self) -> Fast<Number> {
        Ok(match self {
            Num::Pos(n) => Number::from(n),
            Num::Neg(n) => Number::from(n),
            Num::Float(f) => Number::from_f64(f).ok_or(Miss)?,
        })
    }
}

/// The reader: a position in one payload that is known to be UTF-8.
pub struct Reader<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `payload`, or a miss if it is not UTF-8.
    pub fn new(payload: &'a [u8]) -> Fast<Reader<'a>> {
        let text = std::str::from_utf8(payload).map_err(|_| Miss)?;
        Ok(Reader { text, pos: 0 })
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Back to a position this reader was at (a union's next branch reads the value again).
    pub fn rewind(&mut self, pos: usize) {
        self.pos = pos;
    }

    /// The next byte after whitespace, not consumed.
    pub fn peek(&mut self) -> Option<u8> {
        let b = self.bytes();
        while let Some(&c) = b.get(self.pos) {
            if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(c);
            }
            self.pos += 1;
        }
        None
    }

    /// Consumes `c` if it is next.
    pub fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    pub fn expect(&mut self, c: u8) -> Fast<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(Miss)
        }
    }

    /// Only whitespace is left.
    pub fn end(&mut self) -> Fast<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(Miss),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Fast<()> {
        self.peek();
        if self.bytes()[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(Miss)
        }
    }

    pub fn null(&mut self) -> Fast<()> {
        self.literal(b"null")
    }

    pub fn boolean(&mut self) -> Fast<bool> {
        match self.peek() {
            Some(b't') => self.literal(b"true").map(|()| true),
            Some(b'f') => self.literal(b"false").map(|()| false),
            _ => Err(Miss),
        }
    }

    /// A string; escaped ones are decoded into `scratch`.
    pub fn string<'s>(&mut self, scratch: &'s mut String) -> Fast<&'s str>
    where
        'a: 's,
    {
        self.expect(b'"')?;
        let b = self.bytes();
        let start = self.pos;
        let mut escaped = false;
        loop {
            match b.get(self.pos) {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    self.pos += 2;
                }
                Some(&c) if c < 0x20 => return Err(Miss),
                Some(_) => self.pos += 1,
                None => return Err(Miss),
            }
        }
        // The quote is ASCII and a backslash skips one byte only if it is followed by ASCII
        // (else `get` refuses the slice), so both ends are char boundaries.
        let raw = self.text.get(start..self.pos).ok_or(Miss)?;
        self.pos += 1;
        if !escaped {
            return Ok(raw);
        }
        scratch.clear();
        unescape(raw, scratch)?;
        Ok(scratch.as_str())
    }

    /// A number token, as serde_json reads it.
    pub fn number(&mut self) -> Fast<Num> {
        self.peek();
        let b = self.bytes();
        let start = self.pos;
        let mut i = start;
        let neg = b.get(i) == Some(&b'-');
        if neg {
            i += 1;
        }
        // The significand's digits (integer and fraction), while they fit a u64 exactly.
        let (mut m, mut nd) = (0u64, 0usize);
        let mut digit = |c: u8, m: &mut u64| {
            nd += 1;
            if nd <= 19 {
                *m = *m * 10 + u64::from(c - b'0');
            }
        };
        match b.get(i) {
            Some(b'0') => {
                digit(b'0', &mut m);
                i += 1;
            }
            Some(b'1'..=b'9') => {
                while let Some(&c @ b'0'..=b'9') = b.get(i) {
                    digit(c, &mut m);
                    i += 1;
                }
            }
            _ => return Err(Miss),
        }
        let mut float = false;
        let mut frac = 0i64;
        if b.get(i) == Some(&b'.') {
            i += 1;
            if !b.get(i).is_some_and(u8::is_ascii_digit) {
                return Err(Miss);
            }
            while let Some(&c @ b'0'..=b'9') = b.get(i) {
                digit(c, &mut m);
                frac += 1;
                i += 1;
            }
            float = true;
        }
        let mut exp = 0i64;
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            let exp_neg = b.get(i) == Some(&b'-');
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if !b.get(i).is_some_and(u8::is_ascii_digit) {
                return Err(Miss);
            }
            while let Some(&c @ b'0'..=b'9') = b.get(i) {
                exp = (exp * 10 + i64::from(c - b'0')).min(1 << 40);
                i += 1;
            }
            if exp_neg {
                exp = -exp;
            }
            float = true;
        }
        self.pos = i;
        let exact = nd <= 19;
        if !float && exact {
            return Ok(match (neg, m) {
                (false, m) => Num::Pos(m),
                // serde_json reads `-0` as the double -0.0.
                (true, 0) => Num::Float(-0.0),
                (true, m) => match i64::try_from(m) {
                    Ok(n) => Num::Neg(-n),
                    Err(_) if m == 1 << 63 => Num::Neg(i64::MIN),
                    Err(_) => Num::Float(-(m as f64)),
                },
            });
        }
        // Exact in a double and one correctly rounded operation (Clinger's fast path): the
        // same bits as any correct parser. Everything else: the standard library's parser.
        const POW10: [f64; 23] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18,
            1e19, 1e20, 1e21, 1e22,
        ];
        let e10 = exp - frac;
        let f = if exact && m < (1 << 53) && (-22..=22).contains(&e10) {
            let p = POW10[e10.unsigned_abs() as usize];
            let f = if e10 < 0 { m as f64 / p } else { m as f64 * p };
            if neg {
                -f
            } else {
                f
            }
        } else {
            let token = self.text.get(start..i).ok_or(Miss)?;
            token.parse::<f64>().map_err(|_| Miss)?
        };
        if !float && !neg && !exact {
            // Beyond 19 digits but maybe still a u64 (serde_json keeps those as integers).
            if let Ok(n) = self.text.get(start..i).ok_or(Miss)?.parse::<u64>() {
                return Ok(Num::Pos(n));
            }
        }
        if f.is_finite() {
            Ok(Num::Float(f))
        } else {
            Err(Miss)
        }
    }

    /// Reads past one value of any kind; `depth`: the arrays and objects open around it.
    pub fn skip(&mut self, depth: usize) -> Fast<()> {
        let c = self.peek().ok_or(Miss)?;
        if matches!(c, b'[' | b'{') && depth + 1 >= DEPTH_MAX {
            return Err(Miss);
        }
        match c {
            b'n' => self.null(),
            b't' | b'f' => self.boolean().map(drop),
            b'"' => self.string(&mut String::new()).map(drop),
            b'[' => {
                self.pos += 1;
                if self.eat(b']') {
                    return Ok(());
                }
                loop {
                    self.skip(depth + 1)?;
                    if !self.eat(b',') {
                        return self.expect(b']');
                    }
                }
            }
            b'{' => {
                self.pos += 1;
                if self.eat(b'}') {
                    return Ok(());
                }
                let mut scratch = String::new();
                loop {
                    self.string(&mut scratch)?;
                    self.expect(b':')?;
                    self.skip(depth + 1)?;
                    if !self.eat(b',') {
                        return self.expect(b'}');
                    }
                }
            }
            _ => self.number().map(drop),
        }
    }
}

/// Decodes the escapes of a string's raw text (between its quotes).
fn unescape(raw: &str, out: &mut String) -> Fast<()> {
    let mut rest = raw;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let c = match rest.as_bytes().get(i + 1).ok_or(Miss)? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(rest.get(i + 2..i + 6))?;
                let (c, used) = if (0xD800..0xDC00).contains(&hi) {
                    // A high surrogate must be followed by an escaped low one.
                    if rest.get(i + 6..i + 8) != Some("\\u") {
                        return Err(Miss);
                    }
                    let lo = hex4(rest.get(i + 8..i + 12))?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err(Miss);
                    }
                    (char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)).ok_or(Miss)?, 12)
                } else {
                    (char::from_u32(hi).ok_or(Miss)?, 6)
                };
                out.push(c);
                rest = rest.get(i + used..).ok_or(Miss)?;
                continue;
            }
            _ => return Err(Miss),
        };
        out.push(c);
        rest = rest.get(i + 2..).ok_or(Miss)?;
    }
    out.push_str(rest);
    Ok(())
}

fn hex4(s: Option<&str>) -> Fast<u32> {
    let s = s.ok_or(Miss)?;
    if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(Miss);
    }
    u32::from_str_radix(s, 16).map_err(|_| Miss)
}

/// A JSON value parsed into the previous payload's value: a string overwrites the old string's
/// buffer, an object whose keys come in the order the same object's keys came last time is
/// updated in place (no key, string or map node allocated). The telemetry of one device type
/// has the same shape every time, so after the first payload a parse allocates nothing.
///
/// Exact, not a guess: the stored key order of each object (by its position in the payload) is
/// used only to prove that the payload's keys are distinct; the map is reused only if every key
/// is found in it and it holds no other (same count). Anything else builds that object afresh,
/// and the result always equals `serde_json::from_slice`'s.
#[derive(Default)]
pub struct ReusedValue {
    value: Value,
    /// Each object's keys, by its pre-order position in the last payload, each followed by
    /// U+0000 (a key holding one is never remembered: its object is always built afresh).
    shapes: Vec<Shape>,
    objects: usize,
    scratch: String,
}

/// Keys of one object beyond which it is not reused (a huge object is built afresh: it would
/// not repeat anyway, and the stored shapes stay small).
const REUSED_KEYS_MAX: usize = 256;

/// Keys of one object read in place without a map lookup ([`ReusedValue::in_place`]); a larger
/// object is read key by key.
const IN_PLACE_KEYS_MAX: usize = 32;

/// One object's keys in the last payload's order, each followed by U+0000, with where each
/// is and their order sorted (the map's), for [`ReusedValue::in_place`].
#[derive(Default)]
struct Shape {
    keys: String,
    /// Each key's bytes in `keys`, in the payload's order; empty beyond [`IN_PLACE_KEYS_MAX`].
    ranges: Vec<(u32, u32)>,
    /// `by_rank[j]`: the payload position of the map's `j`-th key (the map iterates sorted).
    by_rank: Vec<u8>,
}

impl Shape {
    fn set(&mut self, keys: String) {
        self.ranges.clear();
        self.by_rank.clear();
        let mut start = 0;
        for k in keys.split_terminator('\u{0}') {
            self.ranges.push((start as u32, (start + k.len()) as u32));
            start += k.len() + 1;
        }
        if self.ranges.len() > IN_PLACE_KEYS_MAX || keys.len() > u32::MAX as usize {
            self.ranges.clear();
        }
        let name = |i: usize| &keys[self.ranges[i].0 as usize..self.ranges[i].1 as usize];
        let mut by_rank: Vec<u8> = (0..self.ranges.len() as u8).collect();
        by_rank.sort_by(|&a, &b| name(usize::from(a)).cmp(name(usize::from(b))));
        self.by_rank = by_rank;
        self.keys = keys;
    }
}

/// How far [`ReusedValue::in_place`] got.
enum Step {
    /// The whole object, exactly the stored keys in the stored order.
    Done,
    /// The object ended (its `}` read) after this many keys in place, at this offset of the
    /// stored order.
    Ended(usize, usize),
    /// This many keys in place, then one off the stored order (or a map that is not the stored
    /// one: none); the reader is before that key.
    Diverged(usize, usize),
}

/// `a == b` for short keys without a call into `memcmp` (which costs more than the compare).
#[inline]
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    if a.len() > 16 {
        return a == b;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// Moves the entries of `keys` (each followed by U+0000) out of `map` into a new map.
fn take_keys(map: &mut Map<String, Value>, keys: &str) -> Map<String, Value> {
    let mut f = Map::new();
    for k in keys.split_terminator('\u{0}') {
        if let Some((k, v)) = map.remove_entry(k) {
            f.insert(k, v);
        }
    }
    f
}

impl ReusedValue {
    /// Parses `payload` (exactly one JSON value and whitespace) into the held value.
    pub fn parse(&mut self, payload: &[u8]) -> Fast<&Value> {
        let mut r = Reader::new(payload)?;
        self.objects = 0;
        let mut value = std::mem::take(&mut self.value);
        let ok = self.parse_into(&mut r, &mut value, 0).and_then(|()| r.end());
        self.value = value;
        if ok.is_err() {
            // A half-updated value is still a value; only its shapes must not be trusted.
            self.shapes.clear();
            return Err(Miss);
        }
        Ok(&self.value)
    }

    /// `depth`: the arrays and objects open around the value.
    fn parse_into(&mut self, r: &mut Reader<'_>, slot: &mut Value, depth: usize) -> Fast<()> {
        let c = r.peek().ok_or(Miss)?;
        if matches!(c, b'[' | b'{') && depth + 1 >= DEPTH_MAX {
            return Err(Miss);
        }
        match c {
            b'n' => {
                r.null()?;
                *slot = Value::Null;
            }
            b't' | b'f' => *slot = Value::Bool(r.boolean()?),
            b'"' => {
                let s = r.string(&mut self.scratch)?;
                match slot {
                    Value::String(old) => {
                        old.clear();
                        old.push_str(s);
                    }
                    _ => *slot = Value::String(s.to_string()),
                }
            }
            b'[' => {
                r.pos += 1;
                if !matches!(slot, Value::Array(_)) {
                    *slot = Value::Array(Vec::new());
                }
                let Value::Array(items) = slot else { return Err(Miss) };
                let mut n = 0;
                if !r.eat(b']') {
                    loop {
                        if n == items.len() {
                            items.push(Value::Null);
                        }
                        self.parse_into(r, &mut items[n], depth + 1)?;
                        n += 1;
                        if !r.eat(b',') {
                            r.expect(b']')?;
                            break;
                        }
                    }
                }
                items.truncate(n);
            }
            b'{' => {
                r.pos += 1;
                if !matches!(slot, Value::Object(_)) {
                    *slot = Value::Object(Map::new());
                }
                let Value::Object(map) = slot else { return Err(Miss) };
                self.parse_object(r, map, depth)?;
            }
            _ => *slot = Value::Number(r.number()?.to_number()?),
        }
        Ok(())
    }

    /// The fast half of [`Self::parse_object`]: if `map` holds exactly the keys of `shape`
    /// (checked in the map's sorted order against the stored keys sorted), each value of the
    /// payload whose key comes where `shape` has it is read straight into that key's value.
    fn in_place(
        &mut self,
        r: &mut Reader<'_>,
        map: &mut Map<String, Value>,
        shape: &Shape,
        depth: usize,
    ) -> Fast<Step> {
        let n = shape.ranges.len();
        if n == 0 || map.len() != n {
            return Ok(Step::Diverged(0, 0));
        }
        let name = |i: usize| shape.keys.get(shape.ranges[i].0 as usize..shape.ranges[i].1 as usize).unwrap_or("\u{0}");
        let mut slots: [Option<&mut Value>; IN_PLACE_KEYS_MAX] = std::array::from_fn(|_| None);
        for (j, (k, v)) in map.iter_mut().enumerate() {
            let i = usize::from(shape.by_rank[j]);
            if !same(k, name(i)) {
                return Ok(Step::Diverged(0, 0));
            }
            slots[i] = Some(v);
        }
        let mut at = 0;
        for (i, slot) in slots.iter_mut().enumerate().take(n) {
            let key_start = r.pos();
            if i == 0 && r.eat(b'}') {
                return Ok(Step::Ended(0, 0));
            }
            if !same(r.string(&mut self.scratch)?, name(i)) {
                r.rewind(key_start);
                return Ok(Step::Diverged(i, at));
            }
            at = shape.ranges[i].1 as usize + 1;
            r.expect(b':')?;
            self.parse_into(r, slot.take().ok_or(Miss)?, depth + 1)?;
            if !r.eat(b',') {
                r.expect(b'}')?;
                return Ok(if i + 1 == n { Step::Done } else { Step::Ended(i + 1, at) });
            }
        }
        // Every stored key read and a comma: the payload has more.
        Ok(Step::Diverged(n, at))
    }

    /// `map` (the slot's previous map, maybe empty) becomes the payload's object at `r`, after
    /// its `{`.
    fn parse_object(&mut self, r: &mut Reader<'_>, map: &mut Map<String, Value>, depth: usize) -> Fast<()> {
        let index = self.objects;
        self.objects += 1;
        if self.shapes.len() <= index {
            self.shapes.resize_with(index + 1, Shape::default);
        }
        let mut shape = std::mem::take(&mut self.shapes[index]);
        // The stored order read in place first, without a map lookup; then, from where the
        // payload leaves it, key by key.
        let (mut keys, mut at, ended) = match self.in_place(r, map, &shape, depth)? {
            Step::Done => {
                self.shapes[index] = shape;
                return Ok(());
            }
            Step::Ended(keys, at) => (keys, Some(at), true),
            Step::Diverged(keys, at) => (keys, Some(at), false),
        };
        // Once off the stored order: the new map and the payload's key order so far.
        let mut fresh: Option<(Map<String, Value>, String)> = None;
        // Keys left to read: not after the in-place part's `}`, nor for an empty object.
        let empty = !ended && keys == 0 && r.eat(b'}');
        if !ended && !empty {
            loop {
                let key = r.string(&mut self.scratch)?;
                keys += 1;
                let follows = at.and_then(|a| {
                    let rest = shape.keys.get(a..)?.strip_prefix(key)?.strip_prefix('\u{0}')?;
                    Some(shape.keys.len() - rest.len())
                });
                r.expect(b':')?;
                match (follows, fresh.as_mut()) {
                    (Some(next), None) if keys <= REUSED_KEYS_MAX && map.contains_key(key) => {
                        at = Some(next);
                        let slot = map.get_mut(key).ok_or(Miss)?;
                        self.parse_into(r, slot, depth + 1)?;
                    }
                    _ => {
                        // Off the stored order: the rest of this object goes into a new map,
                        // with the values already read moved over (their keys are the stored
                        // order's first keys, so they are distinct and in `map`).
                        let (f, order) = match fresh.as_mut() {
                            Some(f) => f,
                            None => {
                                let read = shape.keys.get(..at.unwrap_or(0)).unwrap_or("");
                                let f = take_keys(map, read);
                                at = None;
                                fresh.insert((f, read.to_string()))
                            }
                        };
                        let key = key.to_string();
                        if order.len() <= REUSED_KEYS_MAX * 64 {
                            order.push_str(&key);
                            order.push('\u{0}');
                        }
                        let mut v = f.remove(&key).unwrap_or(Value::Null);
                        self.parse_into(r, &mut v, depth + 1)?;
                        f.insert(key, v);
                    }
                }
                if !r.eat(b',') {
                    r.expect(b'}')?;
                    break;
                }
            }
        }
        match fresh {
            None if at == Some(shape.keys.len()) && map.len() == keys => {}
            None => {
                // A prefix of the stored order (fewer keys), or a map holding other keys too:
                // keep only the keys read (distinct, being a prefix of the stored order).
                let read = shape.keys.get(..at.unwrap_or(0)).unwrap_or("");
                *map = take_keys(map, read);
                let mut keys = std::mem::take(&mut shape.keys);
                keys.truncate(at.unwrap_or(0));
                shape.set(keys);
            }
            Some((f, order)) => {
                *map = f;
                // Remembered only for distinct keys without U+0000 (the separator).
                let distinct = map.len() == keys && keys <= REUSED_KEYS_MAX;
                let clean = order.bytes().filter(|&c| c == 0).count() == keys;
                shape.set(if distinct && clean { order } else { String::new() });
            }
        }
        self.shapes[index] = shape;
        Ok(())
    }
}

#[cfg(test)]
#[path = "json_tests.rs"]
mod tests;
