//! Progress: what a running handler reports shows in its job's status (Rust handlers through
//! their context, executables with `GATEHOUSE-PROGRESS` lines), sealed at rest, and goes when
//! the job ends.

use std::time::{Duration, Instant};

use gatehouse_e2e::{Options, TestSystem, repo_root, wait_final};
use serde_json::{Value, json};

/// Polls the status until it shows progress (or 15 s).
async fn progress_of(sys: &TestSystem, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = sys.connect().await.status(id).await.unwrap().json();
        if !s["progress"].is_null() {
            return s;
        }
        assert!(Instant::now() < deadline, "no progress shown: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rust_handlers_progress_shows_in_its_status_sealed_and_goes_when_it_ends() {
    let sys = TestSystem::start_with(Options { testing: true, ..Options::default() }).await;
    let mut conn = sys.connect().await;
    let r = conn.submit(&json!({"kind": "test.progress", "payload": {"ms": 1500}}), None).await.unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let s = progress_of(&sys, &id).await;
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(s["progress"], json!({"percent": 50, "message": "half-way: MARKER-PROGRESS-5150"}));
    // Sealed at rest: the message is not in the database file or its log.
    let mut bytes = std::fs::read(sys.database()).unwrap();
    bytes.extend(std::fs::read(sys.database().with_extension("sqlite-wal")).unwrap_or_default());
    assert!(
        !String::from_utf8_lossy(&bytes).contains("MARKER-PROGRESS-5150"),
        "progress in the clear on disk"
    );
    let done = wait_final(&mut sys.connect().await, &id, Duration::from_secs(15)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(done["progress"].is_null(), "progress outlived the job: {done}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_executables_progress_lines_show_in_its_status() {
    let sys = TestSystem::start_with(Options {
        catalog: Some(repo_root().join("tests/e2e/fixtures/exec/jobs.toml")),
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    let r = conn.submit(&json!({"kind": "acme.progress", "payload": {"seconds": 2}}), None).await.unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let s = progress_of(&sys, &id).await;
    assert_eq!(s["progress"], json!({"percent": 40, "message": "copying"}), "{s}");
    let done = wait_final(&mut sys.connect().await, &id, Duration::from_secs(15)).await;
    assert_eq!(done["result"], json!({"done": true}), "{done}");

    // A stream-mode executable reports on stdout, before its answer, tagged with the job id.
    let mut conn = sys.connect().await;
    let r = conn
        .submit(&json!({"kind": "acme.stream", "payload": {"text": "a", "progress": 70, "sleep": 2}}), None)
        .await
        .unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let s = progress_of(&sys, &id).await;
    assert_eq!(s["progress"], json!({"percent": 70, "message": "streaming"}), "{s}");
    let done = wait_final(&mut sys.connect().await, &id, Duration::from_secs(15)).await;
    assert_eq!(done["result"]["upper"], "A", "{done}");
    sys.stop().await;
}
