//! A queue class moves from classic to quorum lanes and back while clients keep submitting
//! (`gatehouse queues migrate`), as an operator would: the catalog changed, the command run,
//! the worker restarted on the new catalog; the gatekeeper runs throughout, never restarted.

use std::path::Path;
use std::sync::{Arc, Mutex as StdMutex};

use gatehouse_cli::commands::queues::{self, MigrateArgs, Moved};
use gatehouse_e2e::management;
use gatehouse_protocol::catalog::QueueType;

use super::*;

/// Rewrites the catalog with class `class` of type `to`.
fn set_type(catalog: &Path, class: &str, to: QueueType) {
    let text = std::fs::read_to_string(catalog).expect("catalog");
    let name = format!("name = \"{class}\"");
    let mut out = String::new();
    let mut in_class = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_class = false;
        }
        if in_class && line.starts_with("type = ") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line == name {
            in_class = true;
            if to == QueueType::Quorum {
                out.push_str("type = \"quorum\"\n");
            }
        }
    }
    std::fs::write(catalog, out).expect("catalog");
}

/// The broker's type of `queue` (`classic`, `quorum`), or `None` when there is none.
async fn queue_type(queue: &str) -> Option<String> {
    let (status, text) = management::call("GET", &format!("/api/queues/%2f/{queue}"), None).await;
    (status == 200).then(|| {
        serde_json::from_str::<Value>(&text).expect("json")["type"].as_str().unwrap_or("").to_owned()
    })
}

fn args(sys: &TestSystem, to: QueueType) -> MigrateArgs {
    MigrateArgs {
        class: "batch".into(),
        to,
        catalog: sys.catalog_path().to_owned(),
        broker: broker_url(),
        prefix: sys.prefix.clone(),
        wait_s: 60,
    }
}

/// Ledger jobs keep coming (class `batch`) while the class moves to quorum lanes with the
/// worker stopped (its backlog, six jobs at priorities 8 and 5 among it, moves lane by
/// priority; a dead letter moves into the replicated dead-letter queue), runs there, and moves
/// back to a classic queue while the worker still consumes the lanes (the command waits for it
/// to be restarted on the new catalog). Nothing is lost, applied twice or out of order, the
/// gatekeeper is never restarted, and no job is refused as misrouted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_class_moves_to_quorum_lanes_and_back_under_load_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        // (A copy of the catalog in the test's folder, which the test rewrites.)
        max_length: Some(100_000),
        // (`test.sleep`: a backlog in the lanes when the class moves back.)
        testing: true,
        ..Options::default()
    })
    .await;
    let t = sys.topology();
    let worker = sys.worker_process().clone();
    let (n, accounts) = (600, 10);
    let mut rng = Rng(0x9_0e0e);
    let (jobs, order) = ledger_model(n, accounts, "moved", &mut rng);
    let bodies: Vec<Value> = order.iter().map(|&i| jobs[i].body()).collect();
    let submitting = submit_paced(&sys, bodies, 4, Duration::from_millis(40));
    let ((ids, unavailable), (there, back)) = tokio::join!(submitting, move_there_and_back(&sys));
    let model_ids: HashMap<usize, String> = ids.iter().map(|(&pos, id)| (order[pos], id.clone())).collect();
    let per_account = (n / accounts) as u64;
    let drained = wait_ledger(&sys, Duration::from_secs(120), |l| {
        (0..accounts).all(|k| l.get(&format!("moved-{k}")).is_some_and(|(_, s)| *s == per_account))
    })
    .await;
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &model_ids);
    let dead = sys.queue_depth(&t.dead_queue()).await;
    let ledger = oracle::ledger(&sys.storage(), &sys.keyring());
    report(&format!(
        "FAULT queue move classic->quorum->classic (N={n}): accepted={} applied={applied} lost={lost} \
         duplicated={duplicated} order_violations={violations} dead_letters={dead} 503s={unavailable} \
         moved_there={} moved_back={}",
        ids.len(),
        there.jobs,
        back.jobs
    ));
    assert!(drained, "not everything was applied:\n{}", worker.log());
    assert_eq!((applied, lost, duplicated, violations), (n, 0, 0, 0), "applied, lost, duplicated, order");
    assert_eq!((ledger["mark-high"], ledger["mark-mid"]), ((30, 3), (30, 3)));
    assert_eq!(dead, 1, "only the unreadable message is a dead letter (none misrouted)");
    sys.stop().await;
}

/// The operator's part, while the jobs come: a dead letter, the move to quorum lanes with the
/// worker stopped (and six marker jobs at priorities 8 and 5 in its backlog), then back to
/// classic with the worker running and a backlog in the lanes. Answers both moves.
async fn move_there_and_back(sys: &TestSystem) -> (Moved, Moved) {
    let t = sys.topology();
    let worker = sys.worker_process().clone();
    // A message the worker cannot read: a dead letter to move with the dead-letter queue.
    assert!(
        management::publish_with(
            &t.job_queue("batch"),
            "not a job",
            json!({"priority": 1, "delivery_mode": 2})
        )
        .await
    );
    wait_depth(sys, &t.dead_queue(), 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    // To quorum, with the worker stopped: its backlog waits in the classic queue.
    worker.terminate();
    let mut conn = sys.connect().await;
    let mut markers = Vec::new();
    for (account, priority) in [("mark-high", 8), ("mark-mid", 5)] {
        for number in 1..=3 {
            let job = json!({"kind": "ledger.apply", "priority": priority,
                "payload": {"account": account, "amount": 10}, "sequence": {"key": account, "number": number}});
            let res = conn.submit(&job, None).await.expect("submit");
            assert_eq!(res.status, 202, "{}", res.text());
            markers.push(res.json()["id"].as_str().unwrap().to_owned());
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_type(sys.catalog_path(), "batch", QueueType::Quorum);
    let there = queues::migrate(&args(sys, QueueType::Quorum), |_| {}).await.expect("moved to quorum");
    assert!(there.jobs >= 6, "{there:?}");
    assert_eq!(there.dead_letters, 1, "{there:?}");
    for q in [t.job_queue("batch"), t.dead_queue(), t.control_queue()] {
        assert!(there.deleted.contains(&q), "{q} not replaced: {there:?}");
    }
    assert_eq!(queue_type(&t.job_queue("batch")).await, None);
    assert_eq!(queue_type(&t.dead_queue()).await.as_deref(), Some("quorum"));
    // Priority kept: each marker in the lane of its priority (the load is at priority 3).
    assert_eq!(sys.queue_depth(&t.job_queue("batch.p7")).await, 3);
    assert_eq!(sys.queue_depth(&t.job_queue("batch.p4")).await, 3);
    worker.start();
    for id in &markers {
        assert_eq!(wait_final(&mut conn, id, Duration::from_secs(30)).await["status"], "succeeded", "{id}");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Back to classic while the worker still consumes the lanes, with a backlog there (40
    // jobs of 300 ms, 4 at a time): the command waits for the worker, then moves the rest.
    let mut sleepers = Vec::new();
    for _ in 0..40 {
        let res =
            conn.submit(&json!({"kind": "test.sleep", "payload": {"ms": 300}}), None).await.expect("submit");
        assert_eq!(res.status, 202, "{}", res.text());
        sleepers.push(res.json()["id"].as_str().unwrap().to_owned());
    }
    set_type(sys.catalog_path(), "batch", QueueType::Classic);
    let said = Arc::new(StdMutex::new(Vec::<String>::new()));
    let back = tokio::spawn({
        let (args, said) = (args(sys, QueueType::Classic), said.clone());
        async move { queues::migrate(&args, |line| said.lock().unwrap().push(line.to_owned())).await }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while said.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline && !back.is_finished(), "the move did not wait for the worker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(said.lock().unwrap()[0].contains("restart those workers on the new catalog"), "{said:?}");
    worker.terminate();
    worker.start();
    let back: Moved = back.await.unwrap().expect("moved back to classic");
    for lane in ["batch.p7", "batch.p4", "batch.p0"] {
        assert!(back.deleted.contains(&t.job_queue(lane)), "{lane} not deleted: {back:?}");
    }
    assert_eq!(queue_type(&t.dead_queue()).await.as_deref(), Some("classic"));
    assert_eq!(queue_type(&t.job_queue("batch")).await.as_deref(), Some("classic"));
    assert!(back.jobs > 0, "the lanes' backlog was not moved: {back:?}");
    for id in &sleepers {
        assert_eq!(wait_final(&mut conn, id, Duration::from_secs(60)).await["status"], "succeeded", "{id}");
    }

    (there, back)
}

async fn wait_depth(sys: &TestSystem, queue: &str, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sys.queue_depth(queue).await != n {
        assert!(Instant::now() < deadline, "{queue} never held {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
