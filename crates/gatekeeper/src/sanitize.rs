//! Parsing and sanitizing a submit body, before any policy or schema sees it.
//!
//! - **Strict JSON**: duplicate object keys are refused (a parser that keeps the last one and
//!   a reader that keeps the first would see different jobs); invalid UTF-8 is refused by the
//!   parser.
//! - **Bounds** on the payload, whatever the kind: nesting depth, string and key length, array
//!   length, numbers (integers must fit 64 bits; other numbers must be finite and below 1e15,
//!   beyond which they lose integer precision).
//! - **Text**: strings and keys are NFC-normalized; control characters (other than tab, line
//!   feed and carriage return in values) are refused, naming where.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use unicode_normalization::UnicodeNormalization;

use crate::problem::FieldError;

/// Deepest nesting of a payload.
pub const MAX_DEPTH: usize = 32;
/// Longest string value, in characters (as JSON Schema's `maxLength` counts).
pub const MAX_STRING: usize = 64 * 1024;
/// Longest object key, in characters.
pub const MAX_KEY: usize = 256;
/// Most elements of one array. Like [`MAX_STRING`], more than a body of the shipped size
/// (64 KiB) can hold: the body limit binds first; these hold if it is raised.
pub const MAX_ARRAY: usize = 64 * 1024;
/// Largest magnitude of a non-integer number.
pub const MAX_FLOAT: f64 = 1e15;

/// A JSON value parsed without tolerating duplicate keys.
pub struct Strict(pub Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses a body strictly.
///
/// # Errors
/// serde_json's error: malformed JSON, invalid UTF-8, a duplicate key.
pub fn parse(body: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let Strict(v) = Strict::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// Checks the bounds of `payload` and normalizes its text in place; errors point into the
/// request body (`/payload/...`).
///
/// # Errors
/// Every bound broken, up to a handful.
pub fn sanitize(payload: &mut Value) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    walk(payload, "/payload", 0, &mut errors);
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

fn error(errors: &mut Vec<FieldError>, path: &str, message: impl Into<String>) {
    if errors.len() < 16 {
        errors.push(FieldError { path: path.to_owned(), message: message.into() });
    }
}

fn clean_text(s: &str, path: &str, key: bool, errors: &mut Vec<FieldError>) -> Option<String> {
    let bad = |c: char| c.is_control() && (key || !matches!(c, '\t' | '\n' | '\r'));
    if let Some(c) = s.chars().find(|c| bad(*c)) {
        let what = if key { "key" } else { "string" };
        error(errors, path, format!("{what} contains control character U+{:04X}", u32::from(c)));
        return None;
    }
    let limit = if key { MAX_KEY } else { MAX_STRING };
    if s.len() > limit && s.chars().count() > limit {
        error(errors, path, format!("longer than {limit} characters"));
        return None;
    }
    Some(s.nfc().collect())
}

fn walk(v: &mut Value, path: &str, depth: usize, errors: &mut Vec<FieldError>) {
    if depth > MAX_DEPTH {
        return error(errors, path, format!("nested deeper than {MAX_DEPTH} levels"));
    }
    match v {
        Value::String(s) => {
            if let Some(clean) = clean_text(s, path, false, errors) {
                *s = clean;
            }
        }
        Value::Number(n) => {
            // An integral number is an integer however it is written (`3.0`), as JSON Schema says.
            let integral = |f: f64| f.fract() == 0.0 && f >= i64::MIN as f64 && f <= u64::MAX as f64;
            let fits = n.is_i64()
                || n.is_u64()
                || n.as_f64().is_some_and(|f| f.is_finite() && (f.abs() < MAX_FLOAT || integral(f)));
            if !fits {
                error(
                    errors,
                    path,
                    format!("number out of range (integers fit 64 bits, others below {MAX_FLOAT:e})"),
                );
            }
        }
        Value::Array(items) => {
            if items.len() > MAX_ARRAY {
                return error(errors, path, format!("more than {MAX_ARRAY} elements"));
            }
            for (i, item) in items.iter_mut().enumerate() {
                walk(item, &format!("{path}/{i}"), depth + 1, errors);
            }
        }
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (key, mut item) in entries {
                let item_path = format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"));
                let Some(key) = clean_text(&key, &item_path, true, errors) else { continue };
                walk(&mut item, &item_path, depth + 1, errors);
                // Two keys that differ only in normalization ("é" and "e\u{301}") would
                // otherwise become one, and one of the values would be dropped unseen.
                if map.insert(key, item).is_some() {
                    error(errors, &item_path, "duplicate key once NFC-normalized");
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn duplicate_keys_are_refused_anywhere() {
        assert!(parse(br#"{"a":1,"a":2}"#).unwrap_err().to_string().contains("duplicate key"));
        assert!(parse(br#"{"p":{"x":[{"k":1,"k":1}]}}"#).is_err());
        assert!(parse(br#"{"a":1} x"#).is_err());
        assert!(parse(b"{\"a\":\"\xff\"}").is_err());
        assert_eq!(parse(br#"{"a":[1,2.5,"s",null,true]}"#).unwrap(), json!({"a":[1,2.5,"s",null,true]}));
    }

    #[test]
    fn text_is_normalized_and_control_characters_refused() {
        let mut v = json!({"name": "Cafe\u{301}", "note": "line\nbreak"});
        sanitize(&mut v).unwrap();
        assert_eq!(v["name"], "Caf\u{e9}");
        let mut bad = json!({"name": "a\u{0}b"});
        let errs = sanitize(&mut bad).unwrap_err();
        assert_eq!(errs[0].path, "/payload/name");
        assert!(errs[0].message.contains("U+0000"));
        assert!(sanitize(&mut json!({"k\u{7}": 1})).is_err());
    }

    #[test]
    fn bounds_hold() {
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        assert!(sanitize(&mut deep).unwrap_err()[0].message.contains("nested"));
        assert!(sanitize(&mut json!({"n": 1e300})).is_err());
        assert!(sanitize(&mut json!({"n": u64::MAX})).is_ok());
        assert!(sanitize(&mut json!({"s": "x".repeat(MAX_STRING + 1)})).is_err());
    }

    #[test]
    fn bounds_count_characters_and_integral_numbers_are_integers_as_json_schema_says() {
        // 256 characters of 2 bytes each: within the bound the API document states.
        assert!(sanitize(&mut json!({"é".repeat(MAX_KEY): "é".repeat(MAX_STRING)})).is_ok());
        assert!(sanitize(&mut json!({"é".repeat(MAX_KEY + 1): 1})).is_err());
        assert!(sanitize(&mut json!({"n": 2e15})).is_ok(), "2000000000000000.0 is an integer");
        assert!(sanitize(&mut json!({"n": 2.5e15})).is_ok(), "so is 2500000000000000.0");
        assert!(sanitize(&mut json!({"n": 1e15 + 0.5})).is_err(), "not an integer, and too large");
    }

    #[test]
    fn keys_that_become_one_once_normalized_are_refused() {
        let mut v = json!({"e\u{301}": 1, "\u{e9}": 2});
        let errs = sanitize(&mut v).unwrap_err();
        assert!(errs[0].message.contains("duplicate key"), "{errs:?}");
    }
}
