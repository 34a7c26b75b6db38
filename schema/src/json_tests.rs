//! The fast JSON reader against serde_json: the same values, and a miss exactly where serde_json
//! refuses the input (hostile input included).

use super::*;

fn serde(b: &[u8]) -> Option<Value> {
    serde_json::from_slice(b).ok()
}

fn number(tok: &str) -> Fast<Num> {
    let mut r = Reader::new(tok.as_bytes())?;
    let n = r.number()?;
    r.end().map(|()| n)
}

#[test]
fn numbers_read_as_serde_json_reads_them() {
    let long = format!("1{}", "0".repeat(400));
    let tokens = [
        "0",
        "-0",
        "1",
        "-1",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "18446744073709551615",
        "18446744073709551616",
        "1.5",
        "-1.5e3",
        "1E2",
        "1e+2",
        "0.0",
        "-0.0",
        "1e-400",
        "1e400",
        "-1e400",
        "21.75",
        "2.35222",
        "48.85661",
        "0.1",
        "123456789012345678901234567890",
        &long,
        "01",
        "-",
        "1.",
        ".5",
        "1e",
        "+1",
        "--1",
        "0x10",
        "1.e5",
        "1e5.5",
        "00",
        "-01",
        "1 2",
        "0e99999",
        "1e-99999999999999999999",
        "-18446744073709551616",
        "12345678901234567890",
        "123456789012345678901",
        "9007199254740993",
        "9007199254740993.0",
        "0.30000000000000004",
        "1.7976931348623157e308",
        "4.9e-324",
        "2.2250738585072014e-308",
    ];
    for tok in tokens {
        let want = serde(tok.as_bytes()).map(|v| v.as_number().cloned().unwrap());
        let got = number(tok);
        match (&want, got) {
            (None, Err(Miss)) => {}
            (Some(w), Ok(g)) => {
                assert_eq!(w.as_i64(), g.as_i64(), "{tok}");
                let (w, g) = (w.as_f64().unwrap(), g.as_f64());
                // serde_json (without `float_roundtrip`) may be off by one in the last bit for
                // long mantissas; ours is correctly rounded.
                assert!(w.to_bits().abs_diff(g.to_bits()) <= 1, "{tok}: {w} vs {g}");
                if tok.len() < 16 {
                    assert_eq!(w.to_bits(), g.to_bits(), "{tok}");
                }
            }
            _ => panic!("{tok}: serde_json {want:?}, ours {got:?}"),
        }
    }
}

#[test]
fn random_decimals_read_to_the_same_bits_as_serde_json() {
    // Ours is correctly rounded (the standard library's parser, bit for bit); serde_json without
    // `float_roundtrip` is within a bit of it (exactly it inside Clinger's fast path).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let digits = 1 + (x % 17) as usize;
        let m = x >> 20;
        let m = m % 10u64.pow(digits.min(15) as u32);
        let e = (x >> 8) as i64 % 40 - 20;
        let tok = match x % 3 {
            0 => format!("{m}e{e}"),
            1 => format!("-{}.{}", m / 1000, m % 1000),
            _ => format!("{}.{:03}E{e}", m / 1000, m % 1000),
        };
        let w = serde(tok.as_bytes()).unwrap().as_f64().unwrap();
        let g = number(&tok).unwrap().as_f64();
        assert_eq!(tok.parse::<f64>().unwrap().to_bits(), g.to_bits(), "{tok}");
        assert!(w.to_bits().abs_diff(g.to_bits()) <= 1, "{tok}");
    }
}

const DOCS: &[&str] = &[
    r#"{"device":"fleet-eu-car-000123","ts":1733050000123,"temp":21.75,"pos":{"lat":48.8,"lon":2.3},"ok":true}"#,
    r#"{"device":"car-2","ts":1,"temp":-3,"pos":{"lat":1,"lon":2},"ok":false}"#,
    r#"{"ts":1,"device":"car-2","temp":-3,"pos":{"lon":2,"lat":1},"ok":false}"#,
    r#"{"device":"car-2","ts":1}"#,
    r#"{"device":"car-2","ts":1,"temp":0,"extra":[1,2,3]}"#,
    r#"{"device":"car-2","device":"car-3"}"#,
    r#"{"device":"x","ts":2}"#,
    r#"{"device":"x","device":"y"}"#,
    r#"{"a":{"x":1},"b":{"y":1}}"#,
    r#"{"a":5,"b":{"x":1}}"#,
    r#"{"a":{"x":1,"y":2},"b":{"x":1}}"#,
    r#"{"a":[{"k":1},{"k":2},{"k":3}]}"#,
    r#"{"a":[{"k":1}]}"#,
    r#"{"a":[{"k":1},{"j":2}]}"#,
    r#"{"b":1,"a":2,"c":3}"#,
    r#"{"b":1,"a":2}"#,
    r#"{"b":1,"a":2,"c":3,"d":4}"#,
    r#"{"b":1,"c":2,"a":3}"#,
    r#"{"b":1,"b":2,"a":3}"#,
    r#"{"b":{"a":1},"a":{"b":2}}"#,
    r#"{"s":"esc \" \\ \/ \b\f\n\r\t \u00e9 \ud83d\ude00 é 😀"}"#,
    r#"{"":1,"\u0000":2,"a\u0000b":3}"#,
    r#"{"":1,"\u0000":2,"a\u0000b":3}"#,
    r#"{}"#,
    r#"[]"#,
    r#"  [ 1 , "two" , null , true , false , { } , [ ] ]  "#,
    "\t\n{\r\n\"a\" :\t1 }\n",
    r#""just a string""#,
    "-12.5e-3",
    "null",
];

#[test]
fn reused_parse_equals_serde_json_whatever_came_before() {
    // Every document after every other, and each again (the reused path).
    for first in DOCS {
        let mut r = ReusedValue::default();
        for doc in std::iter::once(first).chain(DOCS).chain(DOCS) {
            let want = serde(doc.as_bytes()).unwrap_or_else(|| panic!("not JSON: {doc}"));
            assert_eq!(r.parse(doc.as_bytes()).unwrap(), &want, "{doc} after {first}");
        }
    }
}

#[test]
fn the_same_shape_again_reuses_strings_and_maps() {
    let mut r = ReusedValue::default();
    let a = br#"{"device":"d1","pos":{"lat":1,"lon":2},"tags":["a"]}"#;
    let b = br#"{"device":"d2","pos":{"lat":3,"lon":4},"tags":["b"]}"#;
    r.parse(a).unwrap();
    let at = |v: &Value| {
        (v["device"].as_str().unwrap().as_ptr() as usize, v["pos"].as_object().unwrap() as *const _ as usize)
    };
    let before = at(r.parse(b).unwrap());
    let after = at(r.parse(a).unwrap());
    assert_eq!(before, after, "the string's buffer and the nested map are reused");
    assert_eq!(r.parse(a).unwrap(), &serde(a).unwrap());
}

#[test]
fn hostile_input_is_a_miss_exactly_when_serde_json_refuses_it() {
    let good = DOCS[0].as_bytes();
    let mut cases: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
    for bad in [
        &b"{\"a\":\"\xff\"}"[..],
        b"{\"a\xc3\":1}",
        b"\"\xed\xa0\x80\"",
        b"{\"a\":\"\x01\"}",
        b"{\"a\":\"\\\xc3\xa9\"}",
        br#"{"a":"\ud800"}"#,
        br#"{"a":"\udc00"}"#,
        br#"{"a":"\ud800\u0041"}"#,
        br#"{"a":"\x"}"#,
        br#"{"a":"\u12"}"#,
        br#"{"a":"\u12g4"}"#,
        br#"{"a":1,}"#,
        br#"[1,]"#,
        br#"{"a" 1}"#,
        br#"{a:1}"#,
        br#"{"a":1}{"#,
        br#"{"a":1} 2"#,
        br#"nul"#,
        br#"tru"#,
        br#"{"a":1e400}"#,
        br#"// c"#,
        b"",
        b"   ",
    ] {
        cases.push(bad.to_vec());
    }
    for depth in [126, 127, 128, 129, 100_000] {
        cases.push(format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes());
        cases.push(format!("{}1{}", "[".repeat(depth), "]".repeat(depth)).into_bytes());
        cases.push("{\"a\":".repeat(depth).into_bytes());
        cases.push(format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)).into_bytes());
    }
    for c in &cases {
        let shown = String::from_utf8_lossy(&c[..c.len().min(80)]).into_owned();
        let want = serde(c);
        let got = ReusedValue::default().parse(c).ok().cloned();
        assert_eq!(got, want, "{shown}");
        let skipped = Reader::new(c).and_then(|mut r| r.skip(0).and_then(|()| r.end()));
        assert_eq!(skipped.is_ok(), want.is_some(), "skip {shown}");
    }
}
