//! Start rates (`rate = "20/s"` in the catalog): the reservations live in the workers' storage,
//! so three workers together start 20 jobs a second, not 20 each; the jobs over the rate are
//! held (`throttled`, with the time they start) and start in the order they arrived.

use std::time::Duration;

use gatehouse_e2e::{report, wait_final};
use serde_json::json;

async fn twenty_a_second_on_three_workers(postgres: bool) {
    let sys = gatehouse_e2e::three_workers(postgres, env!("CARGO_BIN_EXE_e2e-worker")).await;
    let mut conn = sys.connect().await;
    let ids =
        gatehouse_e2e::submit_in_turn(&mut conn, &json!({"kind": "test.rated", "payload": {"ms": 10}}), 200)
            .await;
    // The last ones wait seconds for their turn, and say until when.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let last = loop {
        let last = conn.status(&ids[199]).await.unwrap().json();
        if last["status"] != "queued" || std::time::Instant::now() > deadline {
            break last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(last["status"], "throttled", "{last}");
    assert!(last["not_before"].is_string(), "{last}");
    // Each held job's reserved start, read while it is held.
    let mut reserved = std::collections::HashMap::new();
    for id in &ids {
        let s = conn.status(id).await.unwrap().json();
        if let Some(at) = s["not_before"].as_str().and_then(gatehouse_protocol::submit::parse_rfc3339_ms) {
            reserved.insert(id.clone(), at as i64);
        }
    }
    let mut starts = Vec::new();
    for id in &ids {
        let s = wait_final(&mut conn, id, Duration::from_secs(60)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
        starts.push(s["result"]["started_at_ms"].as_i64().unwrap());
    }
    // First held, first started: no job starts before its reserved time, and in the order of
    // the reservations (within a sweep, 250 ms, and the delivery back to a worker). Jobs start
    // in the order the workers first saw them, which is submission order only roughly: three
    // workers hold a dozen deliveries at once, and 80 ms of one decision are 32 jobs' worth of
    // submissions at this pace.
    let mut held: Vec<(i64, i64)> =
        ids.iter().zip(&starts).filter_map(|(id, &s)| reserved.get(id).map(|&r| (r, s))).collect();
    held.sort_unstable();
    let early = held.iter().filter(|(r, s)| s + 5 < *r).count();
    let late_ms: Vec<i64> = held.iter().map(|(r, s)| s - r).collect();
    let most_late = late_ms.iter().max().copied().unwrap_or(0);
    let (mut latest_before, mut out_of_order_ms) = (i64::MIN, 0);
    for &(_, s) in &held {
        if latest_before > i64::MIN {
            out_of_order_ms = out_of_order_ms.max(latest_before - s);
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
    // The rate governs the reservations, exactly: 50 ms apart (to the millisecond the status
    // shows). Actual starts follow them, never early; a start that is late because no worker
    // could take it in time (a loaded machine) runs as soon as one can, so after a stall a
    // second may see more than 20 starts.
    let times: Vec<i64> = held.iter().map(|(r, _)| *r).collect();
    let closest = times.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(0);
    report(&format!(
        "RATE 20/s on 3 workers ({}): 200 starts in {:.2} s = {rate:.1}/s; per second {windows:?}; \
         {} held with a reserved start: reserved starts at least {closest} ms apart; {early} started early, at most {out_of_order_ms} ms before one reserved earlier, at most {most_late} ms late",
        if postgres { "PostgreSQL" } else { "SQLite" },
        (last - first) as f64 / 1000.0,
        held.len()
    ));
    assert!(closest >= 49, "two reserved starts {closest} ms apart");
    assert!(rate < 22.0, "{rate:.1} starts a second");
    assert!(held.len() > 100, "only {} jobs were seen held", held.len());
    assert_eq!(early, 0, "jobs started before their reserved time");
    assert!(out_of_order_ms <= 400, "a job started {out_of_order_ms} ms before one reserved earlier");
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
