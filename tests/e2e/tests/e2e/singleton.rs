//! Singleton kinds: at most one job of the kind runs at a time; the others wait their turn
//! (`waiting_for_turn`) without using up attempts, and all of them run.

use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, management, wait_final};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_submissions_of_a_singleton_kind_never_run_two_at_once() {
    // Prefetch 8: without the singleton rule, up to 8 would run at once.
    let sys =
        TestSystem::start_with(Options { testing: true, prefetch: Some(8), ..Options::default() }).await;
    let ids =
        gatehouse_e2e::submit_at_once(&sys, &json!({"kind": "test.singleton", "payload": {"ms": 40}}), 50)
            .await;
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

/// A second copy of a running singleton job's message (a redelivery after a lost channel, a
/// re-publish) is answered `running` and never runs beside it — here on the other worker, which
/// takes the copy while the first holds the job (prefetch 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_copy_of_a_running_singleton_job_never_runs_beside_it() {
    let sys = TestSystem::start_with(Options {
        testing: true,
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        workers: 2,
        prefetch: Some(1),
        ..Options::default()
    })
    .await;
    for w in sys.worker_processes() {
        w.terminate();
    }
    let mut conn = sys.connect().await;
    let r = conn.submit(&json!({"kind": "test.singleton", "payload": {"ms": 4000}}), None).await.unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let queue = sys.topology().job_queue("batch");
    let queued: Vec<serde_json::Value> = serde_json::from_str(&management::peek(&queue, 1).await).unwrap();
    let (body, priority) =
        (queued[0]["payload"].as_str().unwrap().to_owned(), queued[0]["properties"]["priority"].clone());
    for w in sys.worker_processes() {
        w.start();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while conn.status(&id).await.unwrap().json()["status"] != "running" {
        assert!(std::time::Instant::now() < deadline, "never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(management::publish_with(&queue, &body, json!({"priority": priority, "delivery_mode": 2})).await);
    let s = wait_final(&mut sys.connect().await, &id, Duration::from_secs(30)).await;
    assert_eq!(s["status"], "succeeded", "{s}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs: usize = sys
        .worker_processes()
        .iter()
        .map(|w| w.log().lines().filter(|l| l.contains("test.singleton started") && l.contains(&id)).count())
        .sum();
    assert_eq!(runs, 1, "the job ran {runs} times");
    sys.stop().await;
}

/// `max_running = 4` holds across worker processes: 200 jobs on 3 workers that could run 12 at
/// once (prefetch 4 each) never have more than 4 running by their own start and end times, and
/// do reach 4; each runs once, on its first attempt.
async fn at_most_four_run_at_once_on_three_workers(postgres: bool) {
    let sys = gatehouse_e2e::three_workers(postgres, env!("CARGO_BIN_EXE_e2e-worker")).await;
    let mut conn = sys.connect().await;
    let ids = gatehouse_e2e::submit_in_turn(
        &mut conn,
        &json!({"kind": "test.limited", "payload": {"ms": 60}}),
        200,
    )
    .await;
    let mut spans = Vec::new();
    for id in &ids {
        let s = wait_final(&mut conn, id, Duration::from_secs(60)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
        assert_eq!(s["result"]["attempt"], 1, "waiting used up an attempt: {s}");
        spans.push((
            s["result"]["started_at_ms"].as_i64().unwrap(),
            s["result"]["ended_at_ms"].as_i64().unwrap(),
        ));
    }
    // Ends before starts at the same millisecond: a turn passes when its job ends.
    let mut edges: Vec<(i64, i32)> = spans.iter().flat_map(|&(s, e)| [(s, 1), (e, -1)]).collect();
    edges.sort_unstable();
    let (mut running, mut most) = (0, 0);
    for (_, step) in edges {
        running += step;
        most = most.max(running);
    }
    assert_eq!(most, 4, "at most 4 may run at once, and 4 did");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_running_holds_across_three_workers() {
    at_most_four_run_at_once_on_three_workers(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_running_holds_across_three_workers_on_postgres() {
    at_most_four_run_at_once_on_three_workers(true).await;
}
