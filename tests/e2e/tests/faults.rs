//! The fault suite: real processes, a real broker, real faults. Each scenario compares the end
//! state in the worker's SQLite file with a model computed here, and reports one line:
//! submitted / accepted / applied / lost / duplicated / order violations / dead-lettered /
//! recovery seconds. Sizes are modest for CI; raise them with GATEHOUSE_FAULT_N (jobs) and
//! GATEHOUSE_FAULT_KILLS.
//!
//! Scenarios share one broker, and one of them restarts it, so they run one at a time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gatehouse_cli::commands::dlq::{self, BrokerArgs};
use gatehouse_e2e::{Options, TestSystem, broker_ctl, broker_url, oracle, report, wait_final};
use serde_json::{Value, json};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

#[path = "shared/ledger_model.rs"]
mod ledger_model;
use ledger_model::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_worker_loses_nothing_and_applies_once_in_order() {
    let _serial = SERIAL.lock().await;
    let n = env_size("GATEHOUSE_FAULT_N", 2000);
    let kills = env_size("GATEHOUSE_FAULT_KILLS", 10);
    let accounts = 20;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        ..Options::default()
    })
    .await;

    // The model: `accounts` sequences, numbers 1.., submitted in a shuffled order, plus 5 %
    // deliberate duplicates (the same idempotency key sent again).
    let seed = 0x5eed_1234_u64;
    let (jobs, order) = ledger_model(n, accounts, "k9", &mut Rng(seed));
    let dupes: Vec<usize> = order.iter().take(n / 20).copied().collect();
    let mut bodies: Vec<Value> = order.iter().map(|&i| jobs[i].body()).collect();
    bodies.extend(dupes.iter().map(|&i| jobs[i].body()));

    // The killer: SIGKILL at random moments while work remains, restart at once (as a service
    // manager would), and time each recovery: restart -> the next job applied.
    let per_account = (n / accounts) as u64;
    let all_applied = move |l: &HashMap<String, (i64, u64)>| {
        l.len() == accounts && l.values().all(|(_, s)| *s == per_account)
    };
    let (worker, db, keyring) = (sys.worker_process().clone(), sys.database(), sys.keyring());
    let killer = tokio::spawn(async move {
        let mut rng = Rng(seed ^ 0xdead);
        let mut recoveries = Vec::new();
        for _ in 0..kills {
            tokio::time::sleep(Duration::from_millis(20 + rng.below(100))).await;
            if db.exists() && all_applied(&oracle::ledger(&db, &keyring)) {
                break;
            }
            let before = if db.exists() { oracle::succeeded(&db) } else { 0 };
            worker.kill();
            worker.start();
            let restarted = Instant::now();
            while oracle::succeeded(&db) == before && restarted.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            recoveries.push(restarted.elapsed());
        }
        recoveries
    });
    let (ids, unavailable) = submit_all(&sys, bodies, 8).await;
    let recoveries = killer.await.unwrap();
    let drained = wait_ledger(&sys, Duration::from_secs(180), all_applied).await;
    let recovery = recoveries.iter().max().copied().unwrap_or_default().as_secs_f64();
    // Map the submission order back to model indexes (duplicates map to their original).
    let mut model_ids = HashMap::new();
    for (pos, &i) in order.iter().chain(dupes.iter()).enumerate() {
        if let Some(id) = ids.get(&pos) {
            let prev = model_ids.insert(i, id.clone());
            assert!(prev.is_none_or(|p| p == *id), "an idempotency key mapped to two job ids");
        }
    }
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &model_ids);
    let dead = sys.queue_depth(&sys.topology().dead_queue()).await;
    report(&format!(
        "FAULT kill-9 worker (N={n}, K={} under load, prefetch=4, seed={seed:#x}): submitted={} accepted={} \
         applied={applied} lost={lost} duplicated={duplicated} order_violations={violations} \
         dead_lettered={dead} recovery_s(max kill->next apply)={recovery:.2} worker_starts={} 503s={unavailable}",
        recoveries.len(),
        order.len() + dupes.len(),
        ids.len(),
        sys.worker_process().starts.load(std::sync::atomic::Ordering::SeqCst),
    ));
    assert!(drained, "not everything was applied; worker log:\n{}", sys.worker_process().log());
    assert_eq!((applied, lost, duplicated, violations, dead), (n, 0, 0, 0, 0));
    assert!(recoveries.len() >= kills.min(10), "only {} kills happened under load", recoveries.len());
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restart_and_dropped_connections_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let n = env_size("GATEHOUSE_FAULT_N", 2000) / 4;
    let sys = TestSystem::start().await;
    let jobs: Vec<LedgerJob> =
        (0..n).map(|i| LedgerJob { account: format!("br-{i}"), number: 1, amount: i as i64 + 1 }).collect();
    let bodies: Vec<Value> = jobs.iter().map(LedgerJob::body).collect();

    // Faults while the load runs: a broker restart, then every connection closed. Recovery is
    // measured from `start_app` returning to the gatekeeper's first 202.
    let probe_client = sys.client();
    let faults = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::spawn_blocking(|| broker_ctl(&["stop_app"])).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::spawn_blocking(|| broker_ctl(&["start_app"])).await.unwrap();
        let restarted = Instant::now();
        let probe = json!({"kind": "ledger.balance", "payload": {"account": "br-0"}});
        loop {
            if let Ok(mut c) = probe_client.connect().await
                && c.submit(&probe, None).await.is_ok_and(|r| r.status == 202)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let recovery = restarted.elapsed();
        tokio::task::spawn_blocking(|| broker_ctl(&["close_all_connections", "fault test"])).await.unwrap();
        recovery
    });
    let (ids, unavailable) = submit_paced(&sys, bodies, 4, Duration::from_millis(15)).await;
    let recovery = faults.await.unwrap().as_secs_f64();
    let drained = wait_ledger(&sys, Duration::from_secs(120), |l| l.len() == n).await;
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &ids);
    let over_applied = oracle::ledger(&sys.database(), &sys.keyring())
        .iter()
        .filter(|(a, (b, _))| jobs.iter().any(|j| &j.account == *a && j.amount != *b))
        .count();
    let dead = sys.queue_depth(&sys.topology().dead_queue()).await;
    report(&format!(
        "FAULT broker stop_app/start_app + close_all_connections (N={n}): submitted={n} accepted={} \
         applied={applied} lost={lost} duplicated={} order_violations={violations} dead_lettered={dead} \
         recovery_s={recovery:.2} 503s={unavailable}",
        ids.len(),
        duplicated + over_applied,
    ));
    assert!(drained, "not everything was applied");
    assert!(unavailable > 0, "the gatekeeper never answered 503 while the broker was down");
    assert_eq!((applied, lost, duplicated + over_applied, violations, dead), (n, 0, 0, 0, 0));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_jobs_are_dead_lettered_after_exactly_max_attempts_while_others_flow() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        supervise_worker: true,
        testing: true,
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    let mut submit = async |job: Value| {
        let res = conn.submit(&job, None).await.unwrap();
        assert_eq!(res.status, 202, "{}", res.text());
        res.json()["id"].as_str().unwrap().to_owned()
    };
    // max_attempts is 3 for the test kinds.
    let recovers = submit(json!({"kind": "test.fail", "payload": {"times": 2}})).await;
    let fails = submit(json!({"kind": "test.fail", "payload": {"times": 5}})).await;
    let panics = submit(json!({"kind": "test.panic", "payload": {}})).await;
    let crashes = submit(json!({"kind": "test.crash", "payload": {}})).await;
    let healthy: Vec<Value> =
        (0..50).map(|i| json!({"kind": "vault.put", "payload": {"record": {"i": i}}})).collect();
    let (healthy_ids, _) = submit_all(&sys, healthy, 2).await;

    let mut conn = sys.connect().await;
    let t = Duration::from_secs(60);
    let ok = wait_final(&mut conn, &recovers, t).await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(ok["result"]["attempts"], 3, "{ok}");
    for (id, error) in [(&fails, "failing on purpose"), (&panics, "panic"), (&crashes, "worker stopped")] {
        let s = wait_final(&mut conn, id, t).await;
        assert_eq!(
            (s["status"].as_str(), s["reason"].as_str()),
            (Some("dead_lettered"), Some("max_attempts")),
            "{s}"
        );
        assert!(s["error"].as_str().unwrap().contains(error), "{s}");
    }
    let mut healthy_ok = 0;
    for id in healthy_ids.values() {
        if wait_final(&mut conn, id, t).await["status"] == "succeeded" {
            healthy_ok += 1;
        }
    }
    let args = BrokerArgs { broker: broker_url(), prefix: sys.prefix.clone() };
    let letters = dlq::list(&args).await.unwrap();
    let attempts: HashMap<String, Value> =
        letters.iter().map(|l| (l["id"].as_str().unwrap().to_owned(), l["attempts"].clone())).collect();
    let starts = sys.worker_process().starts.load(std::sync::atomic::Ordering::SeqCst);
    report(&format!(
        "FAULT poison (max_attempts=3): test.fail{{2}}=succeeded after 3 attempts; dead_lettered={} \
         (attempts fail={} panic={} crash={}); healthy applied={healthy_ok}/50; worker_starts={starts}",
        letters.len(),
        attempts.get(&fails).unwrap_or(&Value::Null),
        attempts.get(&panics).unwrap_or(&Value::Null),
        attempts.get(&crashes).unwrap_or(&Value::Null),
    ));
    assert_eq!(letters.len(), 3, "{letters:?}");
    for id in [&fails, &panics, &crashes] {
        assert_eq!(attempts[id.as_str()], 3, "{letters:?}");
    }
    assert_eq!(healthy_ok, 50);
    // One start, then one restart per crash: three attempts crashed, the fourth delivery was
    // dead-lettered without running.
    assert_eq!(starts, 4);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_jobs_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        testing: true,
        ..Options::default()
    })
    .await;
    let n = env_size("GATEHOUSE_FAULT_N", 2000) / 10;
    let jobs: Vec<LedgerJob> =
        (0..n).map(|i| LedgerJob { account: format!("st-{i}"), number: 1, amount: 7 }).collect();
    let mut bodies: Vec<Value> = Vec::new();
    for j in &jobs {
        bodies.push(j.body());
        bodies.push(json!({"kind": "test.sleep", "payload": {"ms": 30}}));
    }
    let (ids, _) = submit_all(&sys, bodies, 4).await;
    let (status, took) = sys.worker_process().terminate().expect("worker was running");
    sys.worker_process().start();
    let drained = wait_ledger(&sys, Duration::from_secs(120), |l| l.len() == n).await;
    let mut conn = sys.connect().await;
    let mut sleeps_ok = 0;
    for (i, id) in &ids {
        if i % 2 == 1 && wait_final(&mut conn, id, Duration::from_secs(60)).await["status"] == "succeeded" {
            sleeps_ok += 1;
        }
    }
    let ledger_ids: HashMap<usize, String> =
        ids.iter().filter(|(i, _)| *i % 2 == 0).map(|(i, id)| (i / 2, id.clone())).collect();
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &ledger_ids);
    let over = oracle::ledger(&sys.database(), &sys.keyring()).values().filter(|(b, _)| *b != 7).count();
    report(&format!(
        "FAULT SIGTERM under load (N={} incl. {n} test.sleep 30 ms): exit={status} in {:.2}s (limit 5s); \
         applied={} lost={} duplicated={} order_violations={violations}",
        2 * n,
        took.as_secs_f64(),
        applied + sleeps_ok,
        lost + (n - sleeps_ok),
        duplicated + over,
    ));
    assert!(drained);
    assert!(status.success(), "the worker exited with {status}");
    assert!(took < Duration::from_secs(6), "shutdown took {took:?}");
    assert_eq!((applied, sleeps_ok, lost, duplicated + over, violations), (n, n, 0, 0, 0));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_lettered_job_replays_once() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::start_with(Options { gap_timeout_s: Some(1), ..Options::default() }).await;
    let mut conn = sys.connect().await;
    let job = |n: u64, amount: i64| json!({"kind": "ledger.apply", "payload": {"account": "rp", "amount": amount}, "sequence": {"key": "rp", "number": n}});
    // Number 2 waits for 1 longer than the gap timeout: dead-lettered.
    let second = conn.submit(&job(2, 10), None).await.unwrap().json()["id"].as_str().unwrap().to_owned();
    let s = wait_final(&mut conn, &second, Duration::from_secs(15)).await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("dead_lettered"), Some("sequence_gap_timeout")),
        "{s}"
    );
    // Number 1 arrives and applies; 2 stays dead (nothing applies out of order).
    let first = conn.submit(&job(1, 1), Some(10)).await.unwrap().json();
    assert_eq!(first["result"]["balance"], 1, "{first}");

    let args = BrokerArgs { broker: broker_url(), prefix: sys.prefix.clone() };
    let letters = dlq::list(&args).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["reason"], "sequence_gap_timeout");
    let operator = sys.operator_key();
    assert_eq!(dlq::replay(&args, Some(&second), &operator).await.unwrap(), vec![second.clone()]);
    let s = wait_final(&mut conn, &second, Duration::from_secs(15)).await;
    assert_eq!(s["result"], json!({"account": "rp", "balance": 11, "sequence": 2}), "{s}");
    // Nothing left to replay; the balance stays.
    assert!(dlq::replay(&args, Some(&second), &operator).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = oracle::ledger(&sys.database(), &sys.keyring());
    report(&format!(
        "FAULT DLQ replay: sequence_gap_timeout dead letter replayed once -> balance {} (want 11), dead letters left {}",
        ledger["rp"].0,
        dlq::list(&args).await.unwrap().len()
    ));
    assert_eq!(ledger["rp"], (11, 2));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_parked_row_does_not_hold_up_the_gap_timeout_of_others() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::start_with(Options { gap_timeout_s: Some(1), ..Options::default() }).await;
    // A damaged row, expired before anything else: the sweep meets it first, every time.
    {
        let db = rusqlite::Connection::open(sys.database()).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        db.pragma_update(None, "foreign_keys", "OFF").unwrap(); // damaged: no job row either
        db.execute(
            "INSERT INTO parked (seq_key, seq_number, job_id, envelope, parked_at_ms, deadline_ms)
             VALUES ('damaged', 2, ?1, x'00ff', 0, 0)",
            [&"d".repeat(32)],
        )
        .unwrap();
    }
    let mut conn = sys.connect().await;
    let job = json!({"kind": "ledger.apply", "payload": {"account": "gx", "amount": 1}, "sequence": {"key": "gx", "number": 2}});
    let id = conn.submit(&job, None).await.unwrap().json()["id"].as_str().unwrap().to_owned();
    let s = wait_final(&mut conn, &id, Duration::from_secs(15)).await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("dead_lettered"), Some("sequence_gap_timeout")),
        "{s}"
    );
    assert_eq!(oracle::count(&sys.database(), "parked"), 1, "the damaged row stays for an operator");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_503_and_loses_nothing_it_accepted() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        max_length: Some(5),
        ..Options::default()
    })
    .await;
    // No worker: the interactive queue fills up at 5 and the broker refuses the rest.
    sys.worker_process().kill();
    let mut conn = sys.connect().await;
    let (mut accepted, mut full) = (Vec::new(), 0);
    for i in 0..8 {
        let res =
            conn.submit(&json!({"kind": "vault.put", "payload": {"record": {"i": i}}}), None).await.unwrap();
        match res.status {
            202 => accepted.push(res.json()["id"].as_str().unwrap().to_owned()),
            503 => {
                let body = gatehouse_e2e::assert_problem(&res, 503, "queue-full");
                assert!(res.retry_after.is_some(), "{body}");
                full += 1;
            }
            other => panic!("unexpected {other}: {}", res.text()),
        }
    }
    sys.worker_process().start();
    let mut applied = 0;
    for id in &accepted {
        if wait_final(&mut conn, id, Duration::from_secs(30)).await["status"] == "succeeded" {
            applied += 1;
        }
    }
    report(&format!(
        "FAULT backpressure (max_length=5, worker down): submitted=8 accepted={} 503_queue_full={full} applied={applied} lost={}",
        accepted.len(),
        accepted.len() - applied
    ));
    assert_eq!((accepted.len(), full, applied), (5, 3, 5));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_jobs_survive_restarts_of_worker_and_broker_and_run_once_not_early() {
    let _serial = SERIAL.lock().await;
    let (accounts, per_account) = (10usize, 3u64);
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        ..Options::default()
    })
    .await;
    // Every job at a time of its own 3 to 5 s from now, submitted in a shuffled order: the
    // sequence order per account must still hold when numbers come due out of order.
    let seed = 0xde1a_u64;
    let mut rng = Rng(seed);
    let start = gatehouse_protocol::clock::now_ms().unsigned_abs();
    let jobs: Vec<(LedgerJob, u64)> = (0..accounts * per_account as usize)
        .map(|i| {
            let job = LedgerJob {
                account: format!("dl-{}", i % accounts),
                number: (i / accounts) as u64 + 1,
                amount: rng.below(1000) as i64 + 1,
            };
            (job, start + 3_000 + rng.below(2_000))
        })
        .collect();
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    rng.shuffle(&mut order);
    let bodies: Vec<Value> = order
        .iter()
        .map(|&i| {
            let mut body = jobs[i].0.body();
            body["not_before"] = json!(gatehouse_protocol::submit::format_rfc3339_ms(jobs[i].1));
            body
        })
        .collect();
    let (ids, unavailable) = submit_all(&sys, bodies, 4).await;
    assert_eq!(ids.len(), jobs.len());

    // While they wait: the worker killed, the broker stopped and started, the worker back.
    let worker = sys.worker_process().clone();
    worker.kill();
    tokio::task::spawn_blocking(|| broker_ctl(&["stop_app"])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::spawn_blocking(|| broker_ctl(&["start_app"])).await.unwrap();
    worker.start();
    let restarted = Instant::now();

    let all_applied = move |l: &HashMap<String, (i64, u64)>| {
        l.len() == accounts && l.values().all(|(_, s)| *s == per_account)
    };
    let drained = wait_ledger(&sys, Duration::from_secs(60), all_applied).await;
    let drain_s = restarted.elapsed().as_secs_f64();
    let model_ids: HashMap<usize, String> =
        order.iter().enumerate().filter_map(|(pos, &i)| Some((i, ids.get(&pos)?.clone()))).collect();
    let ledger_jobs: Vec<LedgerJob> = jobs.iter().map(|(j, _)| j.clone()).collect();
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &ledger_jobs, &model_ids);
    let decided = oracle::decided_at(&sys.database());
    let early =
        model_ids.iter().filter(|(i, id)| decided.get(*id).is_some_and(|at| *at < jobs[**i].1)).count();
    let dead = sys.queue_depth(&sys.topology().dead_queue()).await;
    report(&format!(
        "FAULT delayed jobs across kill-9 worker + broker stop_app/start_app (N={}, due in 3-5 s, seed={seed:#x}): \
         submitted={} accepted={} applied={applied} lost={lost} duplicated={duplicated} \
         order_violations={violations} run_early={early} dead_lettered={dead} all_applied_after_restart_s={drain_s:.2} 503s={unavailable}",
        jobs.len(),
        jobs.len(),
        ids.len(),
    ));
    assert!(drained, "not everything was applied; worker log:\n{}", sys.worker_process().log());
    assert_eq!((applied, lost, duplicated, violations, early, dead), (jobs.len(), 0, 0, 0, 0, 0));
    sys.stop().await;
}

/// The broker's `consumer_timeout` lowered (and its channels checking it every 200 ms) until
/// dropped; channels opened meanwhile take it.
struct LoweredConsumerTimeout;

impl LoweredConsumerTimeout {
    fn to(ms: u64) -> Self {
        broker_ctl(&[
            "eval",
            &format!(
                "application:set_env(rabbit, consumer_timeout, {ms}), application:set_env(rabbit, channel_tick_interval, 200)."
            ),
        ]);
        Self
    }
}

impl Drop for LoweredConsumerTimeout {
    fn drop(&mut self) {
        broker_ctl(&[
            "eval",
            "application:set_env(rabbit, consumer_timeout, 1800000), application:set_env(rabbit, channel_tick_interval, 60000).",
        ]);
    }
}

/// Whether the broker closes a channel that holds a delivery for `hold`.
async fn broker_closes_a_channel_holding_a_delivery(hold: Duration) -> bool {
    use futures_util::StreamExt as _;
    use gatehouse_broker::lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
    use gatehouse_broker::lapin::types::FieldTable;
    use gatehouse_broker::lapin::{BasicProperties, options::BasicAckOptions};
    let conn = gatehouse_broker::connect(&broker_url(), "consumer-timeout-probe").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        q.name().clone(),
        BasicPublishOptions::default(),
        b"held",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "probe".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = consumer.next().await.unwrap().unwrap();
    tokio::time::sleep(hold).await;
    let acked = delivery.acker.ack(BasicAckOptions::default()).await;
    let open = ch.status().connected();
    let _ = conn.close(200, "probe done".into()).await;
    acked.is_err() || !open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_running_past_the_brokers_consumer_timeout_completes_once() {
    let _serial = SERIAL.lock().await;
    let _lowered = LoweredConsumerTimeout::to(1_500);
    // The lowered timeout is live: a plain consumer holding a delivery for 4 s loses its channel.
    assert!(
        broker_closes_a_channel_holding_a_delivery(Duration::from_secs(4)).await,
        "the broker did not enforce the lowered consumer_timeout"
    );
    // A worker that hands its long jobs off after 0.5 s: a 4-second job completes in one
    // attempt, its channel untouched.
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        testing: true,
        hand_off: Some((500, 3_000)),
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let r = sys
        .connect()
        .await
        .submit(&json!({"kind": "test.long", "payload": {"steps": 8, "step_ms": 500}}), None)
        .await
        .unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let done = wait_final(&mut sys.connect().await, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], json!({"resumed_from": 0, "steps_run": 8, "attempt": 1}), "{done}");
    let log = sys.worker_process().log();
    assert!(!log.contains("PRECONDITION_FAILED"), "the broker closed the worker's channel:\n{log}");
    assert!(log.contains("its delivery is acked"), "not handed off:\n{log}");
    report(&format!(
        "consumer_timeout 1.5 s: a 4 s job ran {:.1} s, 1 attempt, channel kept",
        started.elapsed().as_secs_f64()
    ));
    sys.stop().await;
}

#[path = "shared/refusal.rs"]
mod refusal;

#[path = "faults/full_disk.rs"]
mod full_disk;

#[path = "faults/queue_move.rs"]
mod queue_move;

#[path = "faults/flow_control.rs"]
mod flow_control;
