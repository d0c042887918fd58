//! Retention: decided jobs' records are pruned after `retain_s`, in batches, in the background;
//! a status query for a pruned job answers 404 `job-expired`; vault records stay.

use std::time::{Duration, Instant};

use gatehouse_e2e::{Options, TestSystem, management, oracle};
use gatehouse_worker::settings::RetentionSettings;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decided_jobs_are_pruned_after_their_retention_and_then_answer_expired() {
    // Retention may not be shorter than the message age limit; both are 2 s here.
    let sys = TestSystem::start_with(Options {
        max_message_age_s: Some(2),
        retention: Some(RetentionSettings { retain_s: Some(2), prune_batch: 3, prune_every_ms: 200 }),
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..7 {
        let r = conn
            .submit(&json!({"kind": "vault.put", "payload": {"record": {"i": i}}}), Some(10))
            .await
            .unwrap();
        assert_eq!(r.json()["status"], "succeeded", "{}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
        tokens.push(r.json()["result"]["token"].as_str().unwrap().to_owned());
    }
    // Fresh: answered from the record.
    let r = conn.status(&ids[0]).await.unwrap();
    assert_eq!((r.status, r.json()["status"].clone()), (200, json!("succeeded")), "{}", r.text());
    let stored = oracle::jobs(&sys.database(), &sys.keyring());
    assert!(ids.iter().all(|id| stored.contains_key(id)), "every job has its record");

    // Past retention, every record goes (seven jobs, batches of three).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = oracle::jobs(&sys.database(), &sys.keyring());
        if ids.iter().all(|id| !stored.contains_key(id)) {
            break;
        }
        assert!(Instant::now() < deadline, "records still there after 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut conn = sys.connect().await;
    for id in &ids {
        let r = conn.status(id).await.unwrap();
        assert_eq!(r.status, 404, "{}", r.text());
        assert!(r.json()["type"].as_str().unwrap().ends_with("job-expired"), "{}", r.text());
    }
    // Vault records are not job records: they stay until deleted.
    let r =
        conn.submit(&json!({"kind": "vault.get", "payload": {"token": tokens[6]}}), Some(10)).await.unwrap();
    assert_eq!(r.json()["result"]["record"], json!({"i": 6}), "{}", r.text());

    let admin = sys.worker_admin_addr.expect("in-process worker");
    let (_, text) = management::call_at(admin, "GET", "/metrics", None).await;
    let pruned: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("gatehouse_worker_pruned_jobs_total ")?.parse().ok())
        .unwrap_or_else(|| panic!("no pruned counter in:\n{text}"));
    assert!(pruned >= 7.0, "{text}");
    assert!(text.contains("gatehouse_worker_prune_batch_duration_seconds_count"), "{text}");
    sys.stop().await;
}
