//! The custom worker end to end: a real mTLS client → the real gatekeeper → RabbitMQ → the
//! `custom-worker` process → its own handler → reply. And the start-up check against a
//! catalog that does not match its handlers.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, assert_problem, wait_final};
use serde_json::json;

fn own_catalog() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs.toml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn example_wordcount_runs_through_the_real_gatekeeper() {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_custom-worker")),
        catalog: Some(own_catalog()),
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    let res = conn
        .submit(&json!({"kind": "example.wordcount", "payload": {"text": "the quick brown fox"}}), Some(10))
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json()["result"], json!({"words": 4}));
    // Answered from storage afterwards, like any kind.
    let id = res.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_final(&mut conn, &id, Duration::from_secs(5)).await["result"]["words"], 4);
    // The gatekeeper validates the kind's own schema...
    let bad = conn.submit(&json!({"kind": "example.wordcount", "payload": {"text": 7}}), None).await.unwrap();
    assert_problem(&bad, 422, "schema-violation");
    // ... and the built-in kinds run beside it.
    let put =
        conn.submit(&json!({"kind": "vault.put", "payload": {"record": {"a": 1}}}), Some(10)).await.unwrap();
    assert_eq!(put.json()["status"], "succeeded", "{}", put.text());
    sys.stop().await;
}

#[test]
fn a_catalog_that_does_not_match_the_handlers_is_refused_with_exit_64() {
    // The shipped catalog does not list example.wordcount, which this worker handles.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO_BIN_EXE_custom-worker"))
        .current_dir(&root)
        .arg("config/worker.toml")
        .env(
            "WORKER__STORAGE__URL",
            format!("sqlite:{}", std::env::temp_dir().join("gatehouse-custom-worker-64.sqlite").display()),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("example.wordcount") && lines[0].contains("does not list"), "{stderr}");
}
