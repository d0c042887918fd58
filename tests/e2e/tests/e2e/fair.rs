//! Fair shares between clients (`fair_shards` in the catalog, `share` in the policy): within a
//! class and priority, clients take turns at the worker, so one client's backlog does not make
//! another wait for all of it, and shares weigh the turns.

use std::time::Duration;

use gatehouse_client::Client;
use gatehouse_e2e::{OTHER_CLIENT, Options, TestSystem, wait_final};
use serde_json::{Value, json};

/// Jobs of 25 ms on 4 slots: 160 a second.
fn sleep() -> Value {
    json!({"kind": "test.sleep", "payload": {"ms": 25}})
}

/// Submits `n` jobs as `client` over `c` connections at once; answers their ids.
async fn backlog(client: &Client, n: usize, c: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut conn = client.connect().await.expect("connect");
                gatehouse_e2e::submit_in_turn(&mut conn, &sleep(), n / c).await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("submitting"));
    }
    ids
}

/// When each job started (unix ms), once all are done.
async fn starts(client: &Client, ids: &[String]) -> Vec<i64> {
    let mut conn = client.connect().await.expect("connect");
    let mut out = Vec::new();
    for id in ids {
        let s = wait_final(&mut conn, id, Duration::from_secs(120)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
        out.push(s["result"]["started_at_ms"].as_i64().expect("started_at_ms"));
    }
    out
}

#[tokio::test]
async fn a_client_behind_anothers_backlog_starts_within_its_turns() {
    let sys = TestSystem::start_with(Options { testing: true, ..Options::default() }).await;
    let (a, b) = (sys.client(), sys.client_as(OTHER_CLIENT));
    let a_ids = backlog(&a, 1000, 8).await;
    // B comes after A's thousand, at the same priority.
    let mut conn = b.connect().await.expect("connect");
    let submitted = gatehouse_protocol::clock::now_ms();
    let b_ids = gatehouse_e2e::submit_in_turn(&mut conn, &sleep(), 20).await;
    let b_starts = starts(&b, &b_ids).await;
    let a_starts = starts(&a, &a_ids).await;
    let b_waited = b_starts.iter().map(|s| s - submitted).max().unwrap();
    let a_after_b = a_starts.iter().filter(|s| **s > *b_starts.iter().max().unwrap()).count();
    gatehouse_e2e::report(&format!(
        "fair shares: B's 20 jobs behind A's backlog of 1,000: all started within {b_waited} ms; {a_after_b} of A's started after B's last"
    ));
    // Without turns B's jobs wait for A's whole backlog: several seconds at 160 a second.
    assert!(a_after_b > 300, "A's backlog was gone before B's last job started: {a_after_b} left");
    assert!(b_waited < 1500, "B waited {b_waited} ms behind A's backlog");
}

#[tokio::test]
async fn shares_weigh_the_turns_between_backlogged_clients() {
    let sys = TestSystem::start_with(Options {
        testing: true,
        extra_clients: &["heavy", "light"],
        extra_policy: "[[client]]\nidentity = \"heavy\"\nkinds = [\"*\"]\nmax_priority = 9\nshare = 3\n\n\
                       [[client]]\nidentity = \"light\"\nkinds = [\"*\"]\nmax_priority = 9\n",
        ..Options::default()
    })
    .await;
    let (heavy, light) = (sys.client_as("heavy"), sys.client_as("light"));
    let (h, l) = tokio::join!(backlog(&heavy, 400, 4), backlog(&light, 400, 4));
    let (h, l) = (starts(&heavy, &h).await, starts(&light, &l).await);
    // While both still had work queued: until the first of them started its last job.
    let until = *h.iter().max().unwrap().min(l.iter().max().unwrap());
    let from = *h.iter().min().unwrap().max(l.iter().min().unwrap());
    let count = |v: &[i64]| v.iter().filter(|s| (from..until).contains(s)).count() as f64;
    let ratio = count(&h) / count(&l).max(1.0);
    gatehouse_e2e::report(&format!(
        "fair shares: shares 3 and 1, both backlogged: {} and {} starts, {ratio:.2} to one",
        count(&h),
        count(&l)
    ));
    assert!((2.3..=3.7).contains(&ratio), "shares 3:1 gave {ratio:.2}:1");
}
