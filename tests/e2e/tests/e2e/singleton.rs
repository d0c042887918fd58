//! Singleton kinds: at most one job of the kind runs at a time; the others wait their turn
//! (`waiting_for_turn`) without using up attempts, and all of them run.

use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, wait_final};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_submissions_of_a_singleton_kind_never_run_two_at_once() {
    // Prefetch 8: without the singleton rule, up to 8 would run at once.
    let sys =
        TestSystem::start_with(Options { testing: true, prefetch: Some(8), ..Options::default() }).await;
    let client = sys.client();
    let submits: Vec<_> = (0..50)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut conn = client.connect().await.unwrap();
                let r = conn
                    .submit(&json!({"kind": "test.singleton", "payload": {"ms": 40}}), None)
                    .await
                    .unwrap();
                assert_eq!(r.status, 202, "{}", r.text());
                r.json()["id"].as_str().unwrap().to_owned()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for s in submits {
        ids.push(s.await.unwrap());
    }
    // While the first ones run, later ones wait their turn.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut conn = sys.connect().await;
    let mut waiting = 0;
    for id in &ids {
        if conn.status(id).await.unwrap().json()["status"] == "waiting_for_turn" {
            waiting += 1;
        }
    }
    assert!(waiting > 0, "no job was waiting for its turn");
    for id in &ids {
        let s = wait_final(&mut sys.connect().await, id, Duration::from_secs(30)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
        assert_eq!(s["result"]["running_at_once"], 1, "two ran at once: {s}");
        assert_eq!(s["result"]["attempt"], 1, "waiting used up an attempt: {s}");
    }
    sys.stop().await;
}

/// Across three worker processes sharing PostgreSQL, a singleton kind still runs one job at a
/// time: the turns are in storage, and no two runs' intervals overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_singleton_kind_runs_one_at_a_time_across_three_workers_on_postgres() {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        workers: 3,
        testing: true,
        postgres: true,
        prefetch: Some(8),
        ..Options::default()
    })
    .await;
    let client = sys.client();
    let submits: Vec<_> = (0..30)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut conn = client.connect().await.unwrap();
                let r = conn
                    .submit(&json!({"kind": "test.singleton", "payload": {"ms": 40}}), None)
                    .await
                    .unwrap();
                assert_eq!(r.status, 202, "{}", r.text());
                r.json()["id"].as_str().unwrap().to_owned()
            })
        })
        .collect();
    let mut runs = Vec::new();
    for s in submits {
        let id = s.await.unwrap();
        let s = wait_final(&mut sys.connect().await, &id, Duration::from_secs(60)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
        assert_eq!(s["result"]["attempt"], 1, "waiting used up an attempt: {s}");
        runs.push((
            s["result"]["started_at_ms"].as_u64().unwrap(),
            s["result"]["ended_at_ms"].as_u64().unwrap(),
        ));
    }
    runs.sort_unstable();
    for pair in runs.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two runs overlapped: {pair:?}");
    }
    sys.stop().await;
}
