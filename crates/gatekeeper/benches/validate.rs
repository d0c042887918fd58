//! The cost of reading a submit body before policy: strict parse, envelope, sanitize, schema.
//! `cargo bench -p gatehouse-gatekeeper --bench validate`

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse_gatekeeper::sanitize;
use gatehouse_protocol::schemas::Schemas;
use gatehouse_protocol::{Catalog, SubmitRequest};

fn validate(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml");
    let schemas = Schemas::compile(&Catalog::load(&path).unwrap()).unwrap();
    let vault = br#"{"kind":"vault.put","payload":{"record":{"name":"Ada Lovelace","iban":"GB33BUKB20201555555555","city":"Londres","note":"Cafe\u0301 au lait"}},"priority":5,"idempotency_key":"order-9913"}"#;
    let ledger = br#"{"kind":"ledger.apply","payload":{"account":"acct-42","amount":250},"sequence":{"key":"acct-42","number":3}}"#;
    for (name, body) in [("vault.put", &vault[..]), ("ledger.apply", &ledger[..])] {
        c.bench_function(&format!("parse+sanitize+schema {name}"), |b| {
            b.iter(|| {
                let value = sanitize::parse(std::hint::black_box(body)).unwrap();
                let mut req: SubmitRequest = serde_json::from_value(value).unwrap();
                sanitize::sanitize(&mut req.payload).unwrap();
                schemas.validate(&req.kind, &req.payload).unwrap();
                req
            })
        });
    }
}

criterion_group!(benches, validate);
criterion_main!(benches);
