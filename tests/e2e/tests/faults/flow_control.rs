//! Flow control under kill -9: a kind paused and resumed, a kind with `max_running = 4`, two
//! clients in their own fair shards, and a sequenced ledger, while the worker is killed five
//! times. Nothing is lost or applied twice, sequences apply in order, no job of the paused
//! kind starts while it is paused, and never more than four of the limited kind run at once.

use gatehouse_cli::commands::pauses::{self, PauseArgs, Target};

use super::*;

/// The most intervals of `runs` ([start, end) in ms) that overlap at one moment.
fn most_at_once(runs: &[(i64, i64)]) -> usize {
    let mut edges: Vec<(i64, i32)> = runs.iter().flat_map(|&(s, e)| [(s, 1), (e, -1)]).collect();
    // An end before a start at the same millisecond: back to back is not at once.
    edges.sort_unstable();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// (started_at_ms, ended_at_ms) of each job once all have succeeded; the ids not succeeded.
async fn runs(client: &gatehouse_client::Client, ids: &[String]) -> (Vec<(i64, i64)>, Vec<String>) {
    let mut conn = client.connect().await.expect("connect");
    let (mut runs, mut not) = (Vec::new(), Vec::new());
    for id in ids {
        let s = wait_final(&mut conn, id, Duration::from_secs(120)).await;
        match (
            s["status"].as_str(),
            s["result"]["started_at_ms"].as_i64(),
            s["result"]["ended_at_ms"].as_i64(),
        ) {
            (Some("succeeded"), Some(start), Some(end)) => runs.push((start, end)),
            _ => not.push(format!("{id}: {s}")),
        }
    }
    (runs, not)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_fair_shares_and_a_pause_hold_under_kill_9() {
    let _serial = SERIAL.lock().await;
    let n = env_size("GATEHOUSE_FAULT_N", 2000) / 4;
    let kills = 5;
    let accounts = 10;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        testing: true,
        // A limited job holds a lease with its turn: one killed with its worker gives the turn
        // back when that runs out (5 s here, 60 by default).
        hand_off: Some((600_000, 5_000)),
        extra_clients: &["tenant-b"],
        extra_policy: "[[client]]\nidentity = \"tenant-b\"\nkinds = [\"*\"]\nmax_priority = 9\n",
        ..Options::default()
    })
    .await;
    let pause = PauseArgs { config: sys.data.path().join("worker.toml") };
    let sleeper = Target::Kind { name: "test.sleep".into() };
    assert!(pauses::pause(&pause, &sleeper).await.expect("pause"));

    // The killer: five SIGKILLs half a second to 1.5 s apart, each restarted at once.
    let worker = sys.worker_process().clone();
    let killer = tokio::spawn(async move {
        let mut rng = Rng(0xf10c);
        for _ in 0..kills {
            tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
            worker.kill();
            worker.start();
        }
    });

    // dev-client: a shuffled ledger and 100 jobs of the paused kind; tenant-b (fair shard 2):
    // 120 jobs of test.limited (max_running = 4), all at the same time.
    let (jobs, order) = ledger_model(n, accounts, "fc", &mut Rng(0x5eed_f10c));
    let bodies: Vec<Value> = order.iter().map(|&i| jobs[i].body()).collect();
    let (a, b) = (sys.client(), sys.client_as("tenant-b"));
    let paused_jobs = {
        let mut conn = a.connect().await.expect("connect");
        gatehouse_e2e::submit_in_turn(&mut conn, &json!({"kind": "test.sleep", "payload": {"ms": 10}}), 100)
            .await
    };
    let limited = tokio::spawn(async move {
        let mut conn = b.connect().await.expect("connect");
        gatehouse_e2e::submit_in_turn(&mut conn, &json!({"kind": "test.limited", "payload": {"ms": 30}}), 120)
            .await
    });
    let (ids, unavailable) = submit_all(&sys, bodies, 8).await;
    let limited = limited.await.expect("tenant-b submits");
    killer.await.expect("killer");

    // Resumed only after the kills: held across five restarts.
    let resumed_at = gatehouse_protocol::clock::now_ms();
    assert!(pauses::resume(&pause, &sleeper).await.expect("resume").is_some(), "it was not paused");
    let per_account = (n / accounts) as u64;
    let all_applied =
        |l: &HashMap<String, (i64, u64)>| l.len() == accounts && l.values().all(|(_, s)| *s == per_account);
    let drained = wait_ledger(&sys, Duration::from_secs(180), all_applied).await;
    let mut model_ids = HashMap::new();
    for (pos, &i) in order.iter().enumerate() {
        if let Some(id) = ids.get(&pos) {
            model_ids.insert(i, id.clone());
        }
    }
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &model_ids);
    let (sleeps, sleeps_not) = runs(&sys.client(), &paused_jobs).await;
    let (limits, limits_not) = runs(&sys.client_as("tenant-b"), &limited).await;
    let started_while_paused = sleeps.iter().filter(|(start, _)| *start < resumed_at).count();
    let at_once = most_at_once(&limits);
    let dead = sys.queue_depth(&sys.topology().dead_queue()).await;
    report(&format!(
        "FAULT flow control under kill-9 x{kills} (ledger N={n}, 100 paused test.sleep, 120 test.limited \
         max_running=4 from a second client's fair shard): applied={applied} lost={lost} duplicated={duplicated} \
         order_violations={violations} started_while_paused={started_while_paused} paused_jobs_run={} \
         limited_run={} most_running_at_once={at_once} dead_lettered={dead} worker_starts={} 503s={unavailable}",
        sleeps.len(),
        limits.len(),
        sys.worker_process().starts.load(std::sync::atomic::Ordering::SeqCst),
    ));
    assert!(drained, "not everything was applied; worker log:\n{}", sys.worker_process().log());
    assert_eq!((applied, lost, duplicated, violations, dead), (n, 0, 0, 0, 0));
    if !(sleeps_not.is_empty() && limits_not.is_empty()) {
        let log = sys.worker_process().log();
        let _ = std::fs::write(gatehouse_e2e::repo_root().join("target/flow_control-worker.log"), &log);
        let about: Vec<&str> = log
            .lines()
            .filter(|l| sleeps_not.iter().chain(&limits_not).any(|n| l.contains(&n[..32])))
            .collect();
        panic!("not succeeded: {sleeps_not:?} {limits_not:?}\nworker log about them:\n{}", about.join("\n"));
    }
    assert_eq!(started_while_paused, 0, "a job of the paused kind started before it was resumed");
    assert!(at_once <= 4, "{at_once} jobs of a kind with max_running = 4 ran at once");
    sys.stop().await;
}
