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
