//! The custom worker end to end: a real mTLS client → the real gatekeeper → RabbitMQ → the
//! `custom-worker` process → its own handlers (external, and in storage with a table of its
//! own, on SQLite and PostgreSQL) → reply. And the start-up check against a catalog that does
//! not match its handlers.

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

/// A storage handler's write that the database refuses (a name claimed already: the table's
/// primary key) is that job's failed attempt: retried, then dead-lettered after exactly
/// `max_attempts` (2) with the database's reason — never requeued forever — while the first
/// claim's row stays and other jobs run. On SQLite and PostgreSQL (where the write travels with
/// the commit, and is refused there).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_the_database_refuses_is_retried_then_dead_lettered_on_both_backends() {
    for postgres in [false, true] {
        let sys = TestSystem::start_with(Options {
            worker_binary: Some(env!("CARGO_BIN_EXE_custom-worker")),
            catalog: Some(own_catalog()),
            postgres,
            ..Options::default()
        })
        .await;
        let backend = if postgres { "postgres" } else { "sqlite" };
        let mut conn = sys.connect().await;
        let claim = |name: &str, note: &str| json!({"kind": "example.claim", "payload": {"name": name, "note": note}});
        let first = conn.submit(&claim("apollo", "first"), Some(10)).await.unwrap();
        assert_eq!(first.json()["status"], "succeeded", "{backend}: {}", first.text());
        assert_eq!(first.json()["result"], json!({"claimed": "apollo"}));
        let again = conn.submit(&claim("apollo", "second"), None).await.unwrap();
        assert_eq!(again.status, 202, "{}", again.text());
        let id = again.json()["id"].as_str().unwrap().to_owned();
        let s = wait_final(&mut conn, &id, Duration::from_secs(30)).await;
        assert_eq!(
            (s["status"].as_str(), s["reason"].as_str()),
            (Some("dead_lettered"), Some("max_attempts")),
            "{backend}: {s}"
        );
        eprintln!("{backend}: {s}");
        let error = s["error"].as_str().unwrap_or_default();
        assert!(error.contains("storage refused the job's statements"), "{backend}: {s}");
        // The second note never reached the log either.
        assert!(!sys.worker_process().log().contains("second"), "{backend}: a payload reached the log");
        let next = conn.submit(&claim("gemini", "third"), Some(10)).await.unwrap();
        assert_eq!(next.json()["result"], json!({"claimed": "gemini"}), "{backend}: {}", next.text());
        sys.stop().await;
    }
}

#[test]
fn a_catalog_that_does_not_match_the_handlers_is_refused_with_exit_64() {
    // The shipped catalog does not list this worker's own kinds.
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
    let own_kind = ["example.wordcount", "example.claim"].iter().any(|k| lines[0].contains(k));
    assert!(own_kind && lines[0].contains("does not list"), "{stderr}");
}
