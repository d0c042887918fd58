//! Start rates (`rate = "20/s"` in the catalog): the reservations live in the workers' storage,
//! so three workers together start 20 jobs a second, not 20 each; the jobs over the rate are
//! held (`throttled`, with the time they start) and start in the order they arrived.

use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, report, wait_final};
use serde_json::json;

async fn twenty_a_second_on_three_workers(postgres: bool) {
    let sys = TestSystem::start_with(Options {
        testing: true,
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        workers: 3,
        postgres,
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    let mut ids = Vec::new();
    for _ in 0..200 {
        let r = conn.submit(&json!({"kind": "test.rated", "payload": {"ms": 10}}), None).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    // The last ones wait seconds for their turn, and say until when.
    let last = conn.status(&ids[199]).await.unwrap().json();
    assert_eq!(last["status"], "throttled", "{last}");
    assert!(last["not_before"].is_string(), "{last}");
    let mut starts = Vec::new();
    for id in &ids {
        let s = wait_final(&mut conn, id, Duration::from_secs(60)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
        starts.push(s["result"]["started_at_ms"].as_i64().unwrap());
    }
    // In arrival order: no job starts clearly (a sweep, 250 ms, and more) before one that
    // arrived earlier.
    let mut latest_before = i64::MIN;
    let mut overtaken = 0;
    for &s in &starts {
        if latest_before > s + 400 {
            overtaken += 1;
        }
        latest_before = latest_before.max(s);
    }
    let mut sorted = starts.clone();
    sorted.sort_unstable();
    let (first, last) = (sorted[0], sorted[199]);
    let rate = 199.0 * 1000.0 / (last - first) as f64;
    let windows: Vec<usize> = (0..9)
        .map(|k| sorted.iter().filter(|&&s| s >= first + k * 1000 && s < first + (k + 1) * 1000).count())
        .collect();
    report(&format!(
        "RATE 20/s on 3 workers ({}): 200 starts in {:.2} s = {rate:.1}/s; per second {windows:?}; overtaken {overtaken}",
        if postgres { "PostgreSQL" } else { "SQLite" },
        (last - first) as f64 / 1000.0
    ));
    assert!((18.0..=22.0).contains(&rate), "{rate:.1} starts a second");
    assert!(windows.iter().all(|n| (15..=25).contains(n)), "per second: {windows:?}");
    assert_eq!(overtaken, 0, "jobs started before earlier ones");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_holds_across_three_workers() {
    twenty_a_second_on_three_workers(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_holds_across_three_workers_on_postgres() {
    twenty_a_second_on_three_workers(true).await;
}
