//! A third-party fuzzer against the running system: schemathesis reads `GET /openapi.json`
//! (built from the loaded catalog), generates requests from it — valid ones and deliberately
//! invalid ones — sends them over mTLS with the dev client certificate, and runs every check it
//! has (`--checks all`): no 5xx, responses as documented (status codes, content types, headers,
//! bodies), schema-valid requests accepted, schema-invalid ones refused, links followed.

use std::process::Command;

use gatehouse_e2e::{Options, TestSystem};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_nothing_with_every_check() {
    let cli = gatehouse_e2e::schemathesis();
    // Event streams of jobs that wait (a parked sequence number) end after 2 s, as they would
    // after `max_stream_s`, instead of holding schemathesis up.
    let sys = TestSystem::start_with(Options { max_stream_s: Some(2), ..Options::default() }).await;
    let certs = sys.certs.path().to_owned();
    let url = sys.url();
    // The one rule JSON Schema cannot express, for the hooks (see the hooks file).
    let catalog =
        gatehouse_protocol::Catalog::load(&gatehouse_e2e::repo_root().join("config/jobs.toml")).unwrap();
    let key_fields: serde_json::Map<String, serde_json::Value> = catalog
        .kinds()
        .filter_map(|k| Some((k.name.clone(), k.sequence_key_field.clone()?.into())))
        .collect();
    let fixtures = gatehouse_e2e::repo_root().join("tests/e2e/fixtures/schemathesis");
    let report = tempfile::tempdir().unwrap();
    let report_dir = report.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(cli)
            .arg("--config-file")
            .arg(fixtures.join("schemathesis.toml"))
            .arg("run")
            .arg(format!("{url}/openapi.json"))
            // One worker: CPython 3.11 before 3.11.8 breaks `ast.parse` in concurrent threads
            // (gh-106905, "AST constructor recursion depth mismatch"), which hypothesis calls.
            .args(["--checks", "all", "--max-examples", "40", "--seed", "20261130", "--workers", "1"])
            // All but one: see schemathesis.toml (a cancelled job stays readable).
            .args(["--exclude-checks", "use_after_free"])
            .arg("--request-cert")
            .arg(certs.join("client.pem"))
            .arg("--request-cert-key")
            .arg(certs.join("client.key"))
            .arg("--tls-verify")
            .arg(certs.join("ca.pem"))
            .arg("--report-dir")
            .arg(&report_dir)
            // Its example database and caches go beside the report, not into the checkout.
            .current_dir(&report_dir)
            .env("NO_COLOR", "1")
            .env("PYTHONPATH", &fixtures)
            .env("SCHEMATHESIS_HOOKS", "gatehouse_hooks")
            .env("GATEHOUSE_SEQUENCE_KEY_FIELDS", serde_json::Value::Object(key_fields).to_string())
            .output()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    // It tested every operation, with hundreds of cases (a run that generated nothing would
    // also exit 0).
    assert!(text.contains("No issues found"), "{text}");
    assert!(text.contains("Tested: 13"), "{text}");
    let generated: u32 = text
        .lines()
        .find_map(|l| l.trim().split_once(" generated, ")?.0.parse().ok())
        .unwrap_or_else(|| panic!("no case count in:\n{text}"));
    assert!(generated >= 300, "only {generated} cases:\n{text}");
    sys.stop().await;
}
