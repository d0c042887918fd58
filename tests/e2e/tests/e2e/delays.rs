//! Delayed jobs (`not_before` / `delay_s`): accepted now (202 `scheduled`), held in the
//! worker's storage, run at their time and not before; bounded by the kind's `max_delay_s`
//! and the client's policy. (Restarts of every process while jobs wait: the fault suite.)

use std::time::{Duration, Instant};

use gatehouse_e2e::{Options, TestSystem, oracle};
use gatehouse_protocol::submit::parse_rfc3339_ms;
use serde_json::json;

const NO_DELAYS: &str =
    "[[client]]\nidentity = \"nodelay\"\nkinds = [\"*\"]\nmax_priority = 9\nmax_delay_s = 0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delayed_job_is_scheduled_and_runs_at_its_time_not_before() {
    let sys = TestSystem::start_with(Options {
        extra_clients: &["nodelay"],
        extra_policy: NO_DELAYS,
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    // Waiting for the outcome does not apply: a delayed job is answered at once.
    let asked = Instant::now();
    let r = conn
        .submit(&json!({"kind": "vault.put", "payload": {"record": {"a": 1}}, "delay_s": 3}), Some(10))
        .await
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(2), "answered after {:?}", asked.elapsed());
    assert_eq!((r.status, r.json()["status"].clone()), (202, json!("scheduled")), "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let due = parse_rfc3339_ms(r.json()["not_before"].as_str().unwrap()).unwrap();
    assert!(due >= gatehouse_protocol::clock::now_ms().unsigned_abs() + 1_000, "due {due}");

    // Held until then, in the worker's storage.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = conn.status(&id).await.unwrap();
    assert_eq!(s.json()["status"], "scheduled", "{}", s.text());
    assert_eq!(s.json()["not_before"], r.json()["not_before"]);
    assert_eq!(oracle::jobs(&sys.database(), &sys.keyring())[&id].state, "scheduled");

    // Then it runs, once, and not before its time.
    let deadline = Instant::now() + Duration::from_secs(15);
    let done = loop {
        let s = sys.connect().await.status(&id).await.unwrap();
        if s.json()["status"] == "succeeded" {
            break s;
        }
        assert!(Instant::now() < deadline, "not run: {}", s.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(done.json()["result"]["token"].is_string(), "{}", done.text());
    let decided = oracle::decided_at(&sys.database())[&id];
    assert!(decided >= due, "decided at {decided}, due {due}");

    // A time already past runs at once; an RFC 3339 time with an offset is understood.
    let past = json!({"kind": "vault.put", "payload": {"record": {"a": 2}}, "not_before": "2020-01-01T00:00:00+02:00"});
    let mut conn = sys.connect().await;
    let r = conn.submit(&past, Some(10)).await.unwrap();
    assert_eq!(r.json()["status"], "succeeded", "{}", r.text());

    // Bounds: both ways at once, not a date, past the kind's maximum, a client not allowed.
    for (body, status, problem) in [
        (
            json!({"kind": "vault.put", "payload": {"record": {}}, "delay_s": 5, "not_before": "2030-01-01T00:00:00Z"}),
            422,
            "invalid-schedule",
        ),
        (
            json!({"kind": "vault.put", "payload": {"record": {}}, "not_before": "tomorrow"}),
            422,
            "invalid-schedule",
        ),
        (
            json!({"kind": "vault.put", "payload": {"record": {}}, "delay_s": 8 * 24 * 3600}),
            422,
            "delay-too-long",
        ),
        (json!({"kind": "vault.put", "payload": {"record": {}}, "delay_s": null}), 400, "invalid-envelope"),
    ] {
        let r = conn.submit(&body, None).await.unwrap();
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.json()["type"].as_str().unwrap().ends_with(problem), "{body}: {}", r.text());
    }
    let mut nodelay = sys.client_as("nodelay").connect().await.unwrap();
    let r = nodelay
        .submit(&json!({"kind": "vault.put", "payload": {"record": {}}, "delay_s": 5}), None)
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.json()["type"].as_str().unwrap().ends_with("delay-not-allowed"), "{}", r.text());
    sys.stop().await;
}
