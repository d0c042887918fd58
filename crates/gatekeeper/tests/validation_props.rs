//! Property tests of the request parsing and validation path (the part of the gatekeeper
//! that reads untrusted bytes): it never panics, and whatever it accepts is within bounds.
//! A bounded run in CI; PROPTEST_CASES raises it.

use std::path::Path;

use gatehouse_gatekeeper::sanitize;
use gatehouse_protocol::schemas::Schemas;
use gatehouse_protocol::{Catalog, SubmitRequest};
use proptest::prelude::*;
use serde_json::Value;

fn schemas() -> Schemas {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml");
    Schemas::compile(&Catalog::load(&path).unwrap()).unwrap()
}

/// The whole path a body takes before policy: parse, envelope, sanitize, schema.
fn check(schemas: &Schemas, body: &[u8]) -> Option<Value> {
    let value = sanitize::parse(body).ok()?;
    let mut req: SubmitRequest = serde_json::from_value(value).ok()?;
    sanitize::sanitize(&mut req.payload).ok()?;
    schemas.validate(&req.kind, &req.payload).ok()?;
    Some(req.payload)
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn within_bounds(v: &Value, depth: usize) -> bool {
    depth <= sanitize::MAX_DEPTH
        && match v {
            Value::String(s) => !s.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')),
            Value::Array(a) => a.iter().all(|x| within_bounds(x, depth + 1)),
            Value::Object(m) => {
                m.iter().all(|(k, x)| !k.chars().any(char::is_control) && within_bounds(x, depth + 1))
            }
            _ => true,
        }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = check(&schemas(), &body);
    }

    #[test]
    fn structured_jobs_are_accepted_only_within_bounds(
        kind in prop_oneof![Just("vault.put"), Just("vault.get"), Just("ledger.balance"), Just("nope")],
        payload in json_value(),
        record in json_value(),
    ) {
        let schemas = schemas();
        for p in [payload, serde_json::json!({ "record": record })] {
            let body = serde_json::json!({"kind": kind, "payload": p}).to_string();
            if let Some(accepted) = check(&schemas, body.as_bytes()) {
                prop_assert!(within_bounds(&accepted, 0), "accepted out of bounds: {accepted}");
            }
        }
    }
}
