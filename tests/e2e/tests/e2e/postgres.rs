//! The built-in kinds and the job lifecycle with PostgreSQL storage: the same answers as on
//! SQLite (vault records and ledger balances in the families' own tables, sealed; delays;
//! cancellation; status of a job another worker decided).

use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, admin_connection, wait_final};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn built_in_kinds_and_the_lifecycle_work_on_postgres() {
    let sys = TestSystem::start_with(Options { postgres: true, testing: true, ..Options::default() }).await;
    let mut conn = sys.connect().await;
    let ok = async |conn: &mut gatehouse_client::Connection, job: serde_json::Value| {
        let r = conn.submit(&job, Some(10)).await.unwrap();
        assert_eq!(
            (r.status, r.json()["status"].as_str().map(str::to_owned)),
            (200, Some("succeeded".into())),
            "{}",
            r.text()
        );
        r.json()
    };
    let record = json!({"name": "Ada", "marker": "PLAINTEXT-MARKER-PG"});
    let put = ok(&mut conn, json!({"kind": "vault.put", "payload": {"record": record}})).await;
    let token = put["result"]["token"].as_str().unwrap().to_owned();
    let got = ok(&mut conn, json!({"kind": "vault.get", "payload": {"token": token}})).await;
    assert_eq!(got["result"]["record"], record);
    for n in 1..=3 {
        let applied = ok(
            &mut conn,
            json!({"kind": "ledger.apply", "payload": {"account": "pg-1", "amount": 10 * n},
                   "sequence": {"key": "pg-1", "number": n}}),
        )
        .await;
        assert_eq!(applied["result"]["sequence"], n);
    }
    let balance = ok(&mut conn, json!({"kind": "ledger.balance", "payload": {"account": "pg-1"}})).await;
    assert_eq!(balance["result"]["balance"], 60);
    ok(&mut conn, json!({"kind": "vault.delete", "payload": {"token": token}})).await;

    // A delayed job runs at its time; a cancelled one never.
    let later = conn
        .submit(&json!({"kind": "vault.put", "payload": {"record": {}}, "delay_s": 1}), None)
        .await
        .unwrap();
    assert_eq!(later.json()["status"], "scheduled", "{}", later.text());
    let never = conn
        .submit(&json!({"kind": "test.sleep", "payload": {"ms": 100}, "delay_s": 30}), None)
        .await
        .unwrap();
    let never = never.json()["id"].as_str().unwrap().to_owned();
    let cancelled = conn
        .request(gatehouse_client::Method::DELETE, &format!("/v1/jobs/{never}"), &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(cancelled.json()["status"], "cancelled", "{}", cancelled.text());
    let later = wait_final(&mut conn, later.json()["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(later["status"], "succeeded", "{later}");

    // Sealed at rest in PostgreSQL: the marker is nowhere in the clear.
    let gatehouse_e2e::Location::Postgres(c) = sys.storage() else { unreachable!() };
    let db = admin_connection(&c.url, c.password.as_deref().unwrap()).await;
    for (table, column) in [("jobs", "result"), ("ledger", "state")] {
        for row in
            db.query(&format!("SELECT {column} FROM {table} WHERE {column} IS NOT NULL"), &[]).await.unwrap()
        {
            let text: String = row.get(0);
            assert!(
                !text.contains("PLAINTEXT-MARKER") && !text.contains("\"balance\""),
                "{table}.{column}: {text}"
            );
        }
    }
    sys.stop().await;
}

/// A worker cut off from storage while it runs a handed-off job stops the job's handler before
/// its lease runs out (no other worker can then run the job beside it), records nothing of that
/// attempt, and the job runs again once storage is back and the lease has run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_loses_its_lease_stops_the_job_before_another_attempt_can_start() {
    let sys = TestSystem::start_with(Options {
        postgres: true,
        testing: true,
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        // Handed off after 0.5 s, the lease lasts 3 s (renewed every 0.75 s).
        hand_off: Some((500, 3000)),
        ..Options::default()
    })
    .await;
    let gatehouse_e2e::Location::Postgres(c) = sys.storage() else { unreachable!() };
    let db_name = c.url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let node = gatehouse_e2e::postgres();
    let admin = admin_connection(&node.url("postgres"), &node.password().unwrap()).await;
    let mut conn = sys.connect().await;
    let r = conn.submit(&json!({"kind": "test.sleep", "payload": {"ms": 9000}}), None).await.unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !sys.worker_process().log().contains("its delivery is acked") {
        assert!(std::time::Instant::now() < deadline, "never handed off: {}", sys.worker_process().log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Storage goes away for this worker (its database only: the other tests' stay).
    let cut = std::time::Instant::now();
    let cut_ms = gatehouse_protocol::clock::now_ms();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db_name} WITH ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db_name}';"
        ))
        .await
        .unwrap();
    while !sys.worker_process().log().contains("its handler is stopped") {
        assert!(
            cut.elapsed() < Duration::from_secs(5),
            "the handler was not stopped: {}",
            sys.worker_process().log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Before the lease (renewed at most 0.75 s before the cut, 3 s long) could run out.
    assert!(cut.elapsed() < Duration::from_millis(3000), "stopped only after {:?}", cut.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    admin.batch_execute(&format!("ALTER DATABASE {db_name} WITH ALLOW_CONNECTIONS true")).await.unwrap();
    // Its lease runs out, the sweeper sends it back, and it runs again: the outcome is that of
    // an attempt started after the cut (the first one's, had it gone on, would be earlier).
    let s = wait_final(&mut sys.connect().await, &id, Duration::from_secs(60)).await;
    assert_eq!(s["status"], "succeeded", "{s}");
    assert!(s["result"]["started_at_ms"].as_i64().unwrap() > cut_ms, "the cut-off attempt's outcome: {s}");
    sys.stop().await;
}
