//! Long jobs: a handler saves checkpoints, and an attempt interrupted by the death of its
//! worker resumes from the last one; a job that outlives `hand_off_after_ms` has its delivery
//! acked and its message held in storage under a lease, which sends it back to its queue when
//! the worker dies. (The broker's lowered `consumer_timeout`: the fault suite.)

use std::time::{Duration, Instant};

use gatehouse_e2e::{Options, TestSystem, repo_root, wait_final};
use serde_json::{Value, json};

/// Polls the status until its progress reaches `percent` (or 30 s).
async fn progress_reaches(sys: &TestSystem, id: &str, percent: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = sys.connect().await.status(id).await.unwrap().json();
        if s["progress"]["percent"].as_u64().is_some_and(|p| p >= percent) {
            return s;
        }
        assert!(Instant::now() < deadline, "progress never reached {percent}: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_job_killed_mid_way_resumes_from_its_checkpoint_through_its_lease() {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        testing: true,
        // Handed off after 1 s; a lease of 3 s.
        hand_off: Some((1_000, 3_000)),
        ..Options::default()
    })
    .await;
    let r = sys
        .connect()
        .await
        .submit(&json!({"kind": "test.long", "payload": {"steps": 10, "step_ms": 400}}), None)
        .await
        .unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // Past the hand-off (1 s) and four checkpoints in: its delivery is acked by now.
    progress_reaches(&sys, &id, 40).await;
    let worker = sys.worker_process();
    assert!(worker.log().contains("its delivery is acked"), "not handed off:\n{}", worker.log());
    assert_eq!(sys.queue_depth(&sys.topology().job_queue("batch")).await, 0);
    worker.kill();
    // Nothing in the broker holds the job now: only its lease in storage brings it back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sys.queue_depth(&sys.topology().job_queue("batch")).await, 0, "the broker kept it");
    worker.start();

    let done = wait_final(&mut sys.connect().await, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let result = &done["result"];
    let resumed_from = result["resumed_from"].as_u64().unwrap();
    assert!(resumed_from >= 4, "started over instead of resuming: {result}");
    assert_eq!(resumed_from + result["steps_run"].as_u64().unwrap(), 10, "{result}");
    assert_eq!(result["attempt"], 2, "the kill counts as one attempt: {result}");
    assert!(worker.log().contains("lease ran out"), "{}", worker.log());
    // Decided: its checkpoint and lease are gone, and it never runs again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let again = sys.connect().await.status(&id).await.unwrap().json();
    assert_eq!(again["result"], *result, "{again}");
    let db = rusqlite::Connection::open(sys.database()).unwrap();
    for table in ["checkpoints", "leases"] {
        let n: i64 = db.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0, "{table} outlived the job");
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executables_save_checkpoints_and_resume_from_them() {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        catalog: Some(repo_root().join("tests/e2e/fixtures/exec/jobs.toml")),
        ..Options::default()
    })
    .await;
    let r = sys
        .connect()
        .await
        .submit(&json!({"kind": "acme.steps", "payload": {"steps": 8}}), None)
        .await
        .unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    progress_reaches(&sys, &id, 50).await;
    // The worker dies; the broker delivers the job again to the restarted worker.
    let worker = sys.worker_process();
    worker.kill();
    worker.start();
    let done = wait_final(&mut sys.connect().await, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let resumed_from = done["result"]["resumed_from"].as_u64().unwrap();
    assert!(resumed_from >= 4, "started over: {done}");
    assert_eq!(done["result"]["attempt"], 2, "{done}");
    // Sealed at rest: the checkpoint's marker never reached the database file in the clear.
    let mut bytes = std::fs::read(sys.database()).unwrap();
    bytes.extend(std::fs::read(sys.database().with_extension("sqlite-wal")).unwrap_or_default());
    assert!(!String::from_utf8_lossy(&bytes).contains("MARKER-CHECKPOINT"), "checkpoint in the clear");
    sys.stop().await;
}
