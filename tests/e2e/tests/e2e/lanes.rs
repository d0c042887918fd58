//! Quorum-queue classes (`type = "quorum"`): each class is a replicated quorum queue per
//! priority lane, the gatekeeper routes by priority, the worker orders what it holds across
//! lanes. On the test broker (one node) the lanes are quorum queues of one member; the
//! cluster's fault tests are in the fault suite.

use std::collections::HashMap;
use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, management, oracle, report, wait_final};
use serde_json::{Value, json};

async fn queue_info(name: &str) -> Value {
    let (status, body) = management::call("GET", &format!("/api/queues/%2f/{name}"), None).await;
    assert_eq!(status, 200, "{name}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_flow_through_quorum_lanes_with_sequences_retries_and_dead_letters() {
    let sys = TestSystem::start_with(Options { testing: true, quorum: true, ..Options::default() }).await;
    let t = sys.topology();
    for lane in ["interactive.p7", "interactive.p4", "interactive.p0", "batch.p7", "batch.p4", "batch.p0"] {
        let q = queue_info(&t.job_queue(lane)).await;
        assert_eq!(q["type"], "quorum", "{q}");
        assert_eq!(q["arguments"]["x-overflow"], "reject-publish", "{q}");
    }
    let mut conn = sys.connect().await;
    let mut submit = async |body: Value| {
        let r = conn.submit(&body, None).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_owned()
    };
    let high = submit(json!({"kind": "vault.put", "payload": {"record": {"a": 1}}, "priority": 9})).await;
    let mid = submit(json!({"kind": "vault.put", "payload": {"record": {"a": 2}}})).await;
    let mut ledger = Vec::new();
    for n in [3, 1, 2] {
        let body = json!({"kind": "ledger.apply", "payload": {"account": "q", "amount": n * 10},
                          "sequence": {"key": "q", "number": n}});
        ledger.push((n, submit(body).await));
    }
    let retried = submit(json!({"kind": "test.fail", "payload": {"times": 1}})).await;
    let poison = submit(json!({"kind": "test.fail", "payload": {"times": 9}})).await;

    let mut conn = sys.connect().await;
    for id in [&high, &mid, &retried] {
        assert_eq!(wait_final(&mut conn, id, Duration::from_secs(30)).await["status"], "succeeded");
    }
    for (n, id) in &ledger {
        let s = wait_final(&mut conn, id, Duration::from_secs(30)).await;
        let expected = (1..=*n).map(|k| k * 10).sum::<i64>();
        assert_eq!(s["result"]["balance"], expected, "number {n} applied out of order: {s}");
    }
    let dead = wait_final(&mut conn, &poison, Duration::from_secs(30)).await;
    assert_eq!(
        (dead["status"].clone(), dead["reason"].clone()),
        (json!("dead_lettered"), json!("max_attempts"))
    );
    // The dead letter names its lane, which is where a replay goes: replayed, the job runs its
    // attempts again from that lane and is dead-lettered again.
    let letters = gatehouse_e2e::dead_letters(&sys, 1).await;
    assert_eq!(letters[0]["original_queue"], t.job_queue("batch.p0"), "{}", letters[0]);
    let args = gatehouse_cli::commands::dlq::BrokerArgs {
        broker: gatehouse_e2e::broker_url(),
        prefix: sys.prefix.clone(),
    };
    let replayed =
        gatehouse_cli::commands::dlq::replay(&args, Some(&poison), &sys.operator_key()).await.unwrap();
    assert_eq!(replayed.len(), 1);
    assert!(gatehouse_cli::commands::dlq::list(&args).await.unwrap().is_empty());
    let again = gatehouse_e2e::dead_letters(&sys, 1).await;
    assert_eq!((again.len(), again[0]["attempts"].clone()), (1, json!(3)), "{again:?}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn priority_holds_on_quorum_lanes_behind_a_backlog() {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        quorum: true,
        ..Options::default()
    })
    .await;
    // The backlog waits in the priority-0 lane while no worker runs; then five priority-9 jobs.
    sys.worker_process().kill();
    let backlog = 600;
    let mut conn = sys.connect().await;
    let mut low = Vec::new();
    for i in 0..backlog {
        let r = conn
            .submit(&json!({"kind": "vault.put", "payload": {"record": {"i": i}}, "priority": 0}), None)
            .await;
        low.push(r.unwrap().json()["id"].as_str().unwrap().to_owned());
    }
    let mut high = Vec::new();
    for i in 0..5 {
        let r = conn
            .submit(&json!({"kind": "vault.put", "payload": {"record": {"p9": i}}, "priority": 9}), None)
            .await;
        high.push(r.unwrap().json()["id"].as_str().unwrap().to_owned());
    }
    sys.worker_process().start();
    let mut conn = sys.connect().await;
    wait_final(&mut conn, low.last().unwrap(), Duration::from_secs(60)).await;
    for id in &high {
        wait_final(&mut conn, id, Duration::from_secs(60)).await;
    }
    let decided: HashMap<String, u64> = oracle::decided_at(&sys.database());
    let mut ranks = Vec::new();
    for id in &high {
        let at = decided[id];
        ranks.push(low.iter().filter(|l| decided[*l] < at).count());
    }
    // Each priority-9 job ran before all but a prefetch's worth of the backlog.
    assert!(ranks.iter().all(|r| *r <= 50), "backlog jobs decided before each priority-9 job: {ranks:?}");
    report(&format!(
        "quorum lanes: 5 priority-9 jobs behind {backlog} priority-0 ones: backlog jobs run before them {ranks:?}"
    ));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_components_connect_to_any_broker_node_that_answers() {
    // Each component's first broker URL is a port nobody listens on; the second is the broker.
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        dead_first_node: true,
        ..Options::default()
    })
    .await;
    let r = sys
        .connect()
        .await
        .submit(&json!({"kind": "vault.put", "payload": {"record": {"a": 1}}}), Some(20))
        .await
        .unwrap();
    assert_eq!(r.json()["status"], "succeeded", "{}", r.text());
    assert!(
        sys.worker_process().log().contains("connected to a broker node node=2"),
        "{}",
        sys.worker_process().log()
    );
    sys.stop().await;
}
