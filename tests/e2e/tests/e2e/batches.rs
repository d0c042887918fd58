//! Batches (`POST /v1/batches`, `GET /v1/batches/{id}`): accepted whole in one message, each
//! job then run once, in its sequence's order; refused whole naming each refused job; read by
//! their owner only.

use std::time::{Duration, Instant};

use gatehouse_client::Connection;
use gatehouse_e2e::{OTHER_CLIENT, TestSystem, assert_problem, oracle, wait_final};
use serde_json::{Value, json};

/// A group of jobs the gatekeeper answers for: a batch or a workflow.
#[derive(Clone, Copy)]
pub(super) enum Group {
    Batch,
    Workflow,
}

/// Polls the batch or workflow until it is complete; answers its last summary.
pub(super) async fn wait_complete(conn: &mut Connection, group: Group, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = match group {
            Group::Batch => conn.batch(id).await,
            Group::Workflow => conn.workflow(id).await,
        }
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let summary = r.json();
        if summary["status"] == "complete" || Instant::now() > deadline {
            return summary;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ledger(account: &str, number: u64, amount: i64) -> Value {
    json!({"kind": "ledger.apply", "payload": {"account": account, "amount": amount},
        "sequence": {"key": account, "number": number}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_accepted_whole_and_each_job_runs_once_in_order() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    // Ten vault records and a ledger account's ten numbers, the numbers in reverse: the batch
    // is accepted whole, and the sequence still applies 1, 2, ... 10.
    let mut jobs: Vec<Value> =
        (0..10).map(|n| json!({"kind": "vault.put", "payload": {"record": {"n": n}}})).collect();
    jobs.extend((1..=10).rev().map(|n| ledger("b-1", n, i64::try_from(n).unwrap())));
    let r = conn.submit_batch(&jobs).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let accepted = r.json();
    let id = accepted["id"].as_str().unwrap().to_owned();
    let ids: Vec<String> =
        accepted["jobs"].as_array().unwrap().iter().map(|j| j.as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 20);

    let summary = wait_complete(&mut conn, Group::Batch, &id, Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "complete", "{summary}");
    assert_eq!((summary["total"].as_u64(), summary["counts"].clone()), (Some(20), json!({"succeeded": 20})));
    assert_eq!(summary["jobs"], json!(ids), "the ids, in the order submitted");
    for job in &ids {
        let s = wait_final(&mut conn, job, Duration::from_secs(5)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
    }
    let token = {
        let s = wait_final(&mut conn, &ids[3], Duration::from_secs(5)).await;
        s["result"]["token"].as_str().unwrap().to_owned()
    };
    let got =
        conn.submit(&json!({"kind": "vault.get", "payload": {"token": token}}), Some(10)).await.unwrap();
    assert_eq!(got.json()["result"]["record"], json!({"n": 3}));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        oracle::ledger(&sys.database(), &sys.keyring())["b-1"],
        (55, 10),
        "applied once each, in order"
    );
    // Another client does not see it; a made-up id is no batch.
    let mut other = sys.client_as(OTHER_CLIENT).connect().await.unwrap();
    assert_problem(&other.batch(&id).await.unwrap(), 404, "not-found");
    assert_problem(&conn.batch(&"0".repeat(32)).await.unwrap(), 404, "not-found");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_with_a_bad_job_is_refused_whole_naming_each() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let jobs = vec![
        ledger("b-2", 1, 5),
        ledger("b-2", 2, 5),
        json!({"kind": "ledger.apply", "payload": {"account": "b-2", "amount": "five"}, "sequence": {"key": "b-2", "number": 3}}),
        json!({"kind": "nope", "payload": {}}),
        json!({"kind": "vault.put", "payload": {"record": {}}, "reply_to": "elsewhere"}),
    ];
    let r = conn.submit_batch(&jobs).await.unwrap();
    let problem = assert_problem(&r, 422, "batch-refused");
    let paths: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/jobs/2/payload/amount", "/jobs/3/kind", "/jobs/4"], "{problem}");
    // Nothing of it ran: the account's first two numbers were never applied.
    let r = conn.submit(&ledger("b-2", 1, 1), Some(10)).await.unwrap();
    assert_eq!(r.json()["result"]["balance"], 1, "{}", r.text());

    assert_problem(&conn.submit_batch(&[]).await.unwrap(), 422, "batch-size");
    let too_many: Vec<Value> =
        (0..1001).map(|_| json!({"kind": "vault.put", "payload": {"record": {}}})).collect();
    assert_problem(&conn.submit_batch(&too_many).await.unwrap(), 422, "batch-size");
    // One idempotency key twice is one job, as two single submits with it would be.
    let twice = json!({"kind": "vault.put", "payload": {"record": {}}, "idempotency_key": "b-twice"});
    let r = conn.submit_batch(&[twice.clone(), twice]).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["jobs"][0], r.json()["jobs"][1]);
    let summary =
        wait_complete(&mut conn, Group::Batch, r.json()["id"].as_str().unwrap(), Duration::from_secs(30))
            .await;
    assert_eq!(
        (summary["status"].as_str(), summary["counts"].clone()),
        (Some("complete"), json!({"succeeded": 2}))
    );
    sys.stop().await;
}

/// On PostgreSQL with three workers: the batch is recorded once, and every job of it runs once,
/// the sequence in order, whichever worker sends or runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_runs_once_across_three_workers_on_postgres() {
    let sys = gatehouse_e2e::three_workers(true, env!("CARGO_BIN_EXE_e2e-worker")).await;
    let mut conn = sys.connect().await;
    let mut jobs: Vec<Value> =
        (0..100).map(|n| json!({"kind": "vault.put", "payload": {"record": {"n": n}}})).collect();
    jobs.extend((1..=100).rev().map(|n| ledger("b-pg", n, 1)));
    let r = conn.submit_batch(&jobs).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let summary = wait_complete(&mut conn, Group::Batch, &id, Duration::from_secs(60)).await;
    assert_eq!(
        (summary["status"].as_str(), summary["counts"].clone()),
        (Some("complete"), json!({"succeeded": 200})),
        "{summary}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        oracle::ledger(&sys.storage(), &sys.keyring())["b-pg"],
        (100, 100),
        "applied once each, in order"
    );
    sys.stop().await;
}

/// A batch's `on_complete` job runs once, after every job of the batch is decided, and is given
/// the batch (its jobs by state, their ids in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_complete_runs_once_after_every_job_with_the_batch() {
    let sys = TestSystem::start_with(gatehouse_e2e::Options { testing: true, ..Default::default() }).await;
    let mut conn = sys.connect().await;
    let sleep = |ms: u64| json!({"kind": "test.sleep", "payload": {"ms": ms}});
    let mut jobs: Vec<Value> = (0..4).map(|n| sleep(100 + 50 * n)).collect();
    // One that fails for good.
    jobs.push(json!({"kind": "vault.get", "payload": {"token": format!("tok_{}", "0".repeat(32))}}));
    let body = json!({"jobs": jobs, "on_complete": sleep(1)}).to_string().into_bytes();
    let r = conn
        .request(hyper::Method::POST, "/v1/batches", &[("content-type", "application/json")], body)
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let accepted = r.json();
    let on_complete = accepted["on_complete"].as_str().unwrap().to_owned();
    let ids = accepted["jobs"].clone();
    let done = wait_final(&mut conn, &on_complete, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let given = &done["result"]["batch"];
    assert_eq!((given["status"].as_str(), given["jobs"].clone()), (Some("complete"), ids.clone()), "{done}");
    assert_eq!(given["counts"], json!({"failed": 1, "succeeded": 4}), "{done}");
    let started = done["result"]["started_at_ms"].as_i64().unwrap();
    for id in ids.as_array().unwrap().iter().take(4) {
        let s = wait_final(&mut conn, id.as_str().unwrap(), Duration::from_secs(5)).await;
        assert!(
            s["result"]["ended_at_ms"].as_i64().unwrap() <= started,
            "ran before a job of the batch ended: {s}"
        );
    }
    // Once: the batch is marked when its on_complete job is held.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = wait_final(&mut conn, &on_complete, Duration::from_secs(5)).await;
    assert_eq!(again["result"]["started_at_ms"], done["result"]["started_at_ms"]);

    // It is checked like any job: one the client may not submit refuses the batch.
    let body = json!({"jobs": [sleep(1)], "on_complete": {"kind": "nope", "payload": {}}});
    let r = conn
        .request(
            hyper::Method::POST,
            "/v1/batches",
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
        .unwrap();
    let problem = assert_problem(&r, 422, "batch-refused");
    assert_eq!(problem["errors"][0]["path"], "/on_complete/kind", "{problem}");
    sys.stop().await;
}
