//! Pause and resume (`gatehouse pause kind|queue NAME`, `gatehouse resume …`): a paused kind's
//! jobs are accepted and held, unstarted (`paused`), across a worker restart; other kinds run;
//! resuming sends them back in order and every one is applied once, in sequence order. On
//! SQLite and on PostgreSQL (the pause lives in the worker's storage).

use std::time::{Duration, Instant};

use gatehouse_cli::commands::pauses::{self, PauseArgs, Target};
use gatehouse_e2e::{Options, TestSystem, management, oracle, wait_final};
use serde_json::{Value, json};

async fn statuses(sys: &TestSystem, ids: &[String]) -> Vec<String> {
    let mut conn = sys.connect().await;
    let mut out = Vec::new();
    for id in ids {
        out.push(conn.status(id).await.expect("status").json()["status"].as_str().unwrap_or("").to_owned());
    }
    out
}

async fn wait_all(sys: &TestSystem, ids: &[String], state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = statuses(sys, ids).await;
        if now.iter().all(|s| s == state) {
            return;
        }
        assert!(Instant::now() < deadline, "not all {state}: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ledger(account: &str, number: u64) -> Value {
    json!({"kind": "ledger.apply", "payload": {"account": account, "amount": number},
        "sequence": {"key": account, "number": number}})
}

async fn pause_and_resume(postgres: bool) {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        postgres,
        ..Options::default()
    })
    .await;
    let args = PauseArgs { config: sys.data.path().join("worker.toml") };
    let ledger_kind = Target::Kind { name: "ledger.apply".into() };
    assert!(pauses::pause(&args, &ledger_kind).await.unwrap());
    assert!(!pauses::pause(&args, &ledger_kind).await.unwrap(), "paused twice");
    let unknown = pauses::pause(&args, &Target::Kind { name: "nope".into() }).await.unwrap_err();
    assert!(unknown.to_string().contains("no job kind"), "{unknown}");

    // 3 accounts × 10 numbers, in a shuffled order; and other kinds, which run meanwhile.
    let accounts = ["p-a", "p-b", "p-c"];
    let mut order: Vec<(usize, u64)> = (1..=10).flat_map(|n| (0..3).map(move |a| (a, n))).collect();
    order.reverse();
    order.swap(3, 17);
    let mut conn = sys.connect().await;
    let mut ids = Vec::new();
    for (a, n) in &order {
        let res = conn.submit(&ledger(accounts[*a], *n), None).await.unwrap();
        assert_eq!(res.status, 202, "{}", res.text());
        ids.push(res.json()["id"].as_str().unwrap().to_owned());
    }
    let other =
        conn.submit(&json!({"kind": "vault.put", "payload": {"record": {"x": 1}}}), Some(10)).await.unwrap();
    assert_eq!((other.status, other.json()["status"].clone()), (200, json!("succeeded")), "{}", other.text());
    wait_all(&sys, &ids, "paused").await;
    let applied = |l: &std::collections::HashMap<String, (i64, u64)>| {
        accounts.iter().filter(|a| l.contains_key(**a)).count()
    };
    assert_eq!(applied(&oracle::ledger(&sys.storage(), &sys.keyring())), 0, "a paused job ran");
    let admin = sys.worker_admin_addr.expect("a worker admin listener");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = management::call_at(admin, "GET", "/metrics", None).await;
        if metrics.contains("held_jobs{kind=\"ledger.apply\",state=\"paused\"} 30") {
            break;
        }
        assert!(Instant::now() < deadline, "no held_jobs gauge of 30 paused:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The pause outlives the worker: after a restart a new job is held too.
    let worker = sys.worker_process();
    worker.terminate();
    worker.start();
    let res = conn.submit(&ledger("p-a", 11), None).await.unwrap();
    ids.push(res.json()["id"].as_str().unwrap().to_owned());
    wait_all(&sys, &ids, "paused").await;
    let listed = pauses::list(&args).await.unwrap();
    assert_eq!((listed.len(), listed[0].target.as_str(), listed[0].held), (1, "kind:ledger.apply", 31));

    // Resumed: every one applied once, in number order per account.
    assert_eq!(pauses::resume(&args, &ledger_kind).await.unwrap(), Some(31));
    assert_eq!(pauses::resume(&args, &ledger_kind).await.unwrap(), None);
    for id in &ids {
        let s = wait_final(&mut conn, id, Duration::from_secs(30)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
    }
    let l = oracle::ledger(&sys.storage(), &sys.keyring());
    // Amounts 1..=n: the balance after number n is n(n+1)/2.
    assert_eq!((l["p-a"], l["p-b"], l["p-c"]), ((66, 11), (55, 10), (55, 10)));
    let rows = oracle::jobs(&sys.storage(), &sys.keyring());
    for (id, (_, n)) in ids.iter().zip(order.iter().chain([&(0, 11)])) {
        let result = rows[id].result.as_ref().expect("a result");
        assert_eq!(
            (result["sequence"].as_u64(), result["balance"].as_i64()),
            (Some(*n), Some((n * (n + 1) / 2) as i64))
        );
    }

    // A queue class pauses the same way.
    let interactive = Target::Queue { name: "interactive".into() };
    assert!(pauses::pause(&args, &interactive).await.unwrap());
    let held =
        conn.submit(&json!({"kind": "vault.put", "payload": {"record": {"y": 2}}}), None).await.unwrap();
    let held = vec![held.json()["id"].as_str().unwrap().to_owned()];
    wait_all(&sys, &held, "paused").await;
    assert_eq!(pauses::resume(&args, &interactive).await.unwrap(), Some(1));
    wait_all(&sys, &held, "succeeded").await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_kind_holds_its_jobs_across_a_restart_and_resume_applies_them_in_order() {
    pause_and_resume(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_kind_holds_its_jobs_on_postgres_too() {
    pause_and_resume(true).await;
}
