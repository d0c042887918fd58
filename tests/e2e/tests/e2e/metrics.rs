//! The worker's admin listener: `/healthz`, `/readyz` and `/metrics`, whose counters move
//! with the jobs it decides.

use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, management, wait_final};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_metrics_count_jobs_retries_dead_letters_and_parked_jobs() {
    let sys = TestSystem::start_with(Options { testing: true, ..Options::default() }).await;
    let admin = sys.worker_admin_addr.expect("an in-process worker has an admin listener");
    assert_eq!(management::call_at(admin, "GET", "/healthz", None).await.0, 200);
    assert_eq!(management::call_at(admin, "GET", "/readyz", None).await.0, 200);

    let mut conn = sys.connect().await;
    for i in 0..3 {
        let r = conn
            .submit(&json!({"kind": "vault.put", "payload": {"record": {"i": i}}}), Some(10))
            .await
            .unwrap();
        assert_eq!(r.json()["status"], "succeeded");
    }
    // Fails once, then succeeds: one retry.
    let r = conn.submit(&json!({"kind": "test.fail", "payload": {"times": 1}}), None).await.unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_final(&mut conn, &id, Duration::from_secs(15)).await["status"], "succeeded");
    // Number 2 of a key waits for 1: one parked job.
    let j = json!({"kind": "ledger.apply", "payload": {"account": "m", "amount": 1}, "sequence": {"key": "m", "number": 2}});
    assert_eq!(conn.submit(&j, Some(5)).await.unwrap().json()["status"], "waiting_for_sequence");
    // Something not from the gatekeeper: one dead letter.
    assert!(
        management::publish_to_queue(&sys.topology().job_queue("interactive"), r#"{"forged":1}"#, json!({}))
            .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (status, text) = management::call_at(admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    for line in [
        r#"gatehouse_worker_jobs_total{kind="vault.put",outcome="succeeded"} 3"#,
        r#"gatehouse_worker_jobs_total{kind="test.fail",outcome="succeeded"} 1"#,
        r#"gatehouse_worker_retries_total{kind="test.fail"} 1"#,
        r#"gatehouse_worker_dead_letters_total{reason="bad_signature"} 1"#,
        "gatehouse_worker_parked_jobs 1",
        "gatehouse_worker_broker_connected 1",
        r#"gatehouse_worker_handler_duration_seconds_count{kind="vault.put"} 3"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    // A parked job is not decided: not counted as an outcome (it is a gauge).
    assert!(!text.contains(r#"outcome="waiting_for_sequence""#), "{text}");
    // Storage: group commits (at least one per decided job here, which ran one at a time) and
    // their sizes, and the checkpoint passes that follow commits.
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert!(value("gatehouse_worker_storage_commit_duration_seconds_count ") >= 5.0, "{text}");
    assert!(value("gatehouse_worker_storage_commit_group_size_sum ") >= 5.0, "{text}");
    assert!(
        value(r#"gatehouse_worker_storage_checkpoint_duration_seconds_count{kind="pass"} "#) >= 1.0,
        "{text}"
    );
    sys.stop().await;
}

/// Scrapes and dashboard polls do not drive counts over storage: however many come, the parked
/// and scheduled jobs are counted at most once per 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrapes_and_dashboard_polls_count_storage_at_most_once_per_period() {
    let sys = TestSystem::start().await;
    let admin = sys.worker_admin_addr.expect("an in-process worker has an admin listener");
    let counts = async || {
        let (_, text) = management::call_at(admin, "GET", "/metrics", None).await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix("gatehouse_worker_waiting_counts_total ")?.trim().parse::<u64>().ok()
            })
            .unwrap_or_else(|| panic!("no waiting counts in:\n{text}"))
    };
    let before = counts().await;
    let mut polls = tokio::task::JoinSet::new();
    for i in 0..100 {
        let path = if i % 2 == 0 { "/metrics" } else { "/dashboard.json" };
        polls.spawn(async move { management::call_at(admin, "GET", path, None).await.0 });
    }
    while let Some(status) = polls.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let after = counts().await;
    // The first scrape counted; within 5 s, a 5 s boundary allows one more.
    assert!(after - before <= 1, "{} counts for 101 requests", after - before);
    sys.stop().await;
}
