//! Cancellation (`DELETE /v1/jobs/{id}`): a scheduled, parked or running job ends `cancelled`
//! and never runs (or stops); a sequenced job uses up its number; an ended job is `409`;
//! another client's is `404`.

use std::time::{Duration, Instant};

use gatehouse_client::{Connection, Method, Response};
use gatehouse_e2e::{Options, TestSystem, oracle, repo_root, wait_final};
use serde_json::{Value, json};

async fn cancel(conn: &mut Connection, id: &str) -> Response {
    conn.request(Method::DELETE, &format!("/v1/jobs/{id}"), &[], Vec::new()).await.unwrap()
}

fn id_of(r: &Response) -> String {
    r.json()["id"].as_str().unwrap_or_else(|| panic!("no id: {}", r.text())).to_owned()
}

/// Polls the status (on fresh connections) until `want` or 15 s.
async fn wait_for(sys: &TestSystem, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = sys.connect().await.status(id).await.unwrap().json();
        if s["status"] == want {
            return s;
        }
        assert!(Instant::now() < deadline, "{id} is {s}, not {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduled_parked_and_running_jobs_are_cancelled_and_a_cancelled_number_is_used_up() {
    let sys = TestSystem::start_with(Options {
        testing: true,
        extra_clients: &["mallory"],
        extra_policy: "[[client]]\nidentity = \"mallory\"\nkinds = [\"*\"]\nmax_priority = 9\n",
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;

    // A delayed job: cancelled at once; it never runs.
    let r = conn
        .submit(&json!({"kind": "vault.put", "payload": {"record": {"a": 1}}, "delay_s": 60}), None)
        .await
        .unwrap();
    let scheduled = id_of(&r);
    let mut mallory = sys.client_as("mallory").connect().await.unwrap();
    assert_eq!(cancel(&mut mallory, &scheduled).await.status, 404, "another client's job");
    let c = cancel(&mut conn, &scheduled).await;
    assert_eq!((c.status, c.json()["status"].clone()), (200, json!("cancelled")), "{}", c.text());
    // Its message comes by at once and is recorded cancelled, never run.
    // (Within 30 s: the e2e binary runs its tests side by side on two cores.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while oracle::jobs(&sys.database(), &sys.keyring()).get(&scheduled).is_none_or(|j| j.state != "cancelled")
    {
        assert!(Instant::now() < deadline, "the cancelled job was not recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(oracle::jobs(&sys.database(), &sys.keyring())[&scheduled].result, None);
    assert_eq!(oracle::count(&sys.database(), "vault"), 0, "the cancelled vault.put ran");
    // Cancelling again changes nothing (DELETE is idempotent).
    let mut conn = sys.connect().await;
    let again = cancel(&mut conn, &scheduled).await;
    assert_eq!((again.status, again.json()["status"].clone()), (200, json!("cancelled")), "{}", again.text());

    // A sequenced job waiting for its predecessor: cancelled, its number used up.
    let apply = |n: u64, amount: i64| json!({"kind": "ledger.apply", "payload": {"account": "c1", "amount": amount}, "sequence": {"key": "c1", "number": n}});
    let two = conn.submit(&apply(2, 20), Some(5)).await.unwrap();
    assert_eq!(two.json()["status"], "waiting_for_sequence", "{}", two.text());
    let two = id_of(&two);
    assert_eq!(cancel(&mut conn, &two).await.json()["status"], "cancelled");
    let one = conn.submit(&apply(1, 1), Some(5)).await.unwrap();
    assert_eq!(one.json()["status"], "succeeded");
    // A job that already ended cannot be cancelled: a conflict.
    let late = cancel(&mut conn, &id_of(&one)).await;
    assert_eq!(late.status, 409, "{}", late.text());
    assert!(late.json()["type"].as_str().unwrap().ends_with("job-already-ended"), "{}", late.text());
    let three = conn.submit(&apply(3, 300), Some(5)).await.unwrap();
    assert_eq!(three.json()["status"], "succeeded", "number 3 runs: 2 was used up by its cancellation");
    assert_eq!(three.json()["result"]["balance"], 301, "{}", three.text());
    assert_eq!(oracle::jobs(&sys.database(), &sys.keyring())[&two].state, "cancelled");

    // A running handler is told to stop, and the job ends cancelled.
    let r = conn.submit(&json!({"kind": "test.sleep", "payload": {"ms": 20_000}}), None).await.unwrap();
    let sleeping = id_of(&r);
    wait_for(&sys, &sleeping, "running").await;
    let asked = Instant::now();
    let c = cancel(&mut sys.connect().await, &sleeping).await;
    assert_eq!((c.status, c.json()["status"].clone()), (202, json!("running")), "{}", c.text());
    let s = wait_final(&mut sys.connect().await, &sleeping, Duration::from_secs(15)).await;
    assert_eq!(s["status"], "cancelled", "{s}");
    assert!(asked.elapsed() < Duration::from_secs(3), "stopped after {:?}", asked.elapsed());
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_executable_gets_sigterm_and_ends_cancelled() {
    let sys = TestSystem::start_with(Options {
        catalog: Some(repo_root().join("tests/e2e/fixtures/exec/jobs.toml")),
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    let r = conn.submit(&json!({"kind": "acme.linger", "payload": {}}), None).await.unwrap();
    let id = id_of(&r);
    wait_for(&sys, &id, "running").await;
    let asked = Instant::now();
    let c = cancel(&mut sys.connect().await, &id).await;
    assert_eq!(c.status, 202, "{}", c.text());
    let s = wait_final(&mut sys.connect().await, &id, Duration::from_secs(15)).await;
    assert_eq!(s["status"], "cancelled", "{s}");
    // It stopped on SIGTERM, well inside the grace period after which SIGKILL would come.
    assert!(asked.elapsed() < Duration::from_secs(3), "stopped after {:?}", asked.elapsed());
    sys.stop().await;
}
