//! Scale-out on PostgreSQL: several worker processes and gatekeepers on one database, under
//! faults — kill -9 of random workers, poison jobs that crash whichever worker runs them, a
//! restart of the database server — and the lifecycle across workers (schedules, singletons). Each scenario compares the database with its model and
//! reports one line like the fault suite's. Sizes: GATEHOUSE_FAULT_N, GATEHOUSE_FAULT_KILLS.
//!
//! The scenarios restart the tests' PostgreSQL server, so they run one at a time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gatehouse_cli::commands::dlq::{self, BrokerArgs};
use gatehouse_e2e::{Options, TestSystem, broker_url, oracle, report, wait_final};
use serde_json::{Value, json};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

#[path = "shared/ledger_model.rs"]
mod ledger_model;
use ledger_model::*;

#[path = "shared/refusal.rs"]
mod refusal;

#[path = "shared/schedules_scenario.rs"]
mod schedules_scenario;

fn starts(sys: &TestSystem) -> Vec<u32> {
    sys.worker_processes().iter().map(|w| w.starts.load(std::sync::atomic::Ordering::SeqCst)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_and_two_gatekeepers_on_postgres_lose_nothing_under_kill_9_and_poison() {
    let _serial = SERIAL.lock().await;
    let n = env_size("GATEHOUSE_FAULT_N", 2000);
    let kills = env_size("GATEHOUSE_FAULT_KILLS", 10).max(10);
    let accounts = 20;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        supervise_worker: true,
        testing: true,
        postgres: true,
        workers: 3,
        gatekeepers: 2,
        ..Options::default()
    })
    .await;

    // Poison (max_attempts is 3 for the test kinds), through the second gatekeeper: a job that
    // crashes whichever worker runs it, one that panics, one that fails every time.
    let clients = sys.clients();
    let mut conn = clients[1].connect().await.unwrap();
    let mut poison = Vec::new();
    for job in [
        json!({"kind": "test.crash", "payload": {}}),
        json!({"kind": "test.panic", "payload": {}}),
        json!({"kind": "test.fail", "payload": {"times": 5}}),
    ] {
        let res = conn.submit(&job, None).await.unwrap();
        assert_eq!(res.status, 202, "{}", res.text());
        poison.push(res.json()["id"].as_str().unwrap().to_owned());
    }

    // The model: `accounts` sequences, numbers 1.., shuffled, 5 % sent again with the same
    // idempotency key (through either gatekeeper).
    let seed = 0x5ca1_e0ff_u64;
    let (jobs, order) = ledger_model(n, accounts, "so", &mut Rng(seed));
    let dupes: Vec<usize> = order.iter().take(n / 20).copied().collect();
    let mut bodies: Vec<Value> = order.iter().map(|&i| jobs[i].body()).collect();
    bodies.extend(dupes.iter().map(|&i| jobs[i].body()));

    // The killer: SIGKILL of a random worker at random moments while work remains, restarted
    // at once; the gap each kill makes in the stream of applied jobs is timed.
    let per_account = (n / accounts) as u64;
    let all_applied = move |l: &HashMap<String, (i64, u64)>| {
        l.len() == accounts && l.values().all(|(_, s)| *s == per_account)
    };
    let (workers, db, keyring) = (sys.worker_processes().to_vec(), sys.storage(), sys.keyring());
    let killer = tokio::spawn(async move {
        let mut rng = Rng(seed ^ 0xdead);
        let mut gaps = Vec::new();
        for _ in 0..kills {
            tokio::time::sleep(Duration::from_millis(50 + rng.below(150))).await;
            if all_applied(&oracle::ledger(&db, &keyring)) {
                break;
            }
            let before = oracle::succeeded(&db);
            let victim = &workers[rng.below(workers.len() as u64) as usize];
            victim.kill();
            victim.start();
            let killed = Instant::now();
            while oracle::succeeded(&db) == before && killed.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            gaps.push(killed.elapsed());
        }
        gaps
    });
    let (ids, unavailable) = submit_all(&sys, bodies, 8).await;
    let gaps = killer.await.unwrap();
    let drained = wait_ledger(&sys, Duration::from_secs(180), all_applied).await;
    let mut model_ids = HashMap::new();
    for (pos, &i) in order.iter().chain(dupes.iter()).enumerate() {
        if let Some(id) = ids.get(&pos) {
            let prev = model_ids.insert(i, id.clone());
            assert!(prev.is_none_or(|p| p == *id), "an idempotency key mapped to two job ids");
        }
    }
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &model_ids);

    // Every poison job dead-lettered after exactly 3 attempts counted across the workers.
    let mut conn = sys.connect().await;
    for id in &poison {
        let s = wait_final(&mut conn, id, Duration::from_secs(120)).await;
        assert_eq!(
            (s["status"].as_str(), s["reason"].as_str()),
            (Some("dead_lettered"), Some("max_attempts")),
            "{s}"
        );
    }
    let args = BrokerArgs { broker: broker_url(), prefix: sys.prefix.clone() };
    let letters = dlq::list(&args).await.unwrap();
    let attempts: HashMap<String, Value> =
        letters.iter().map(|l| (l["id"].as_str().unwrap().to_owned(), l["attempts"].clone())).collect();
    let healthy_dead = letters.iter().filter(|l| !poison.iter().any(|p| l["id"] == p.as_str())).count();
    let gap = gaps.iter().max().copied().unwrap_or_default().as_secs_f64();
    report(&format!(
        "FAULT postgres 3 workers + 2 gatekeepers, kill -9 of a random worker (N={n}, K={} under load, \
         20 keys, seed={seed:#x}): submitted={} accepted={} applied={applied} lost={lost} \
         duplicated={duplicated} order_violations={violations} healthy_dead_lettered={healthy_dead} \
         poison dead_lettered={} (attempts crash={} panic={} fail={}) max_gap_s(kill->next apply)={gap:.2} \
         worker_starts={:?} 503s={unavailable}",
        gaps.len(),
        order.len() + dupes.len(),
        ids.len(),
        letters.len() - healthy_dead,
        attempts.get(&poison[0]).unwrap_or(&Value::Null),
        attempts.get(&poison[1]).unwrap_or(&Value::Null),
        attempts.get(&poison[2]).unwrap_or(&Value::Null),
        starts(&sys),
    ));
    assert!(drained, "not everything was applied; first worker's log:\n{}", sys.worker_process().log());
    assert_eq!((applied, lost, duplicated, violations, healthy_dead), (n, 0, 0, 0, 0));
    for id in &poison {
        assert_eq!(attempts[id.as_str()], 3, "{letters:?}");
    }
    assert!(gaps.len() >= 10, "only {} kills happened under load", gaps.len());
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let n = env_size("GATEHOUSE_FAULT_N", 2000) / 2;
    let accounts = 20;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        supervise_worker: true,
        postgres: true,
        workers: 3,
        gatekeepers: 2,
        ..Options::default()
    })
    .await;
    let seed = 0x09e5_7a27_u64;
    let (jobs, order) = ledger_model(n, accounts, "pg", &mut Rng(seed));
    let bodies: Vec<Value> = order.iter().map(|&i| jobs[i].body()).collect();
    let db = sys.storage();
    // The fault, while the load runs: `pg_ctl restart` (fast shutdown: every connection cut,
    // transactions in flight rolled back). Recovery: from the server being back to the next
    // job applied.
    let restart = tokio::spawn(async move {
        while oracle::succeeded(&db) < 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let began = Instant::now();
        tokio::task::spawn_blocking(|| gatehouse_e2e::postgres().restart().expect("postgres restarts"))
            .await
            .unwrap();
        let down = began.elapsed();
        let back = Instant::now();
        let before = oracle::succeeded(&db);
        while oracle::succeeded(&db) == before && back.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (down, back.elapsed())
    });
    let (ids, unavailable) = submit_paced(&sys, bodies, 6, Duration::from_millis(5)).await;
    let (down, recovery) = restart.await.unwrap();
    let per_account = (n / accounts) as u64;
    let drained = wait_ledger(&sys, Duration::from_secs(180), |l| {
        l.len() == accounts && l.values().all(|(_, s)| *s == per_account)
    })
    .await;
    // Submission positions back to model indexes.
    let model_ids: HashMap<usize, String> = ids.iter().map(|(pos, id)| (order[*pos], id.clone())).collect();
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &model_ids);
    let dead = sys.queue_depth(&sys.topology().dead_queue()).await;
    report(&format!(
        "FAULT postgres restart under load (pg_ctl restart -m fast; 3 workers + 2 gatekeepers, N={n}, 20 keys): \
         submitted={n} accepted={} applied={applied} lost={lost} duplicated={duplicated} \
         order_violations={violations} dead_lettered={dead} restart_s={:.2} recovery_s(back->next apply)={:.2} \
         worker_starts={:?} 503s={unavailable}",
        ids.len(),
        down.as_secs_f64(),
        recovery.as_secs_f64(),
        starts(&sys),
    ));
    assert!(drained, "not everything was applied; first worker's log:\n{}", sys.worker_process().log());
    assert_eq!((applied, lost, duplicated, violations, dead), (n, 0, 0, 0, 0));
    // The workers rode it out: none exited.
    assert_eq!(starts(&sys), [1, 1, 1], "a worker exited during the restart");
    sys.stop().await;
}

/// The longest any transaction of `db`'s database has been waiting for a lock right now
/// (`pg_stat_activity`), in ms.
async fn longest_lock_wait_ms(admin: &tokio_postgres::Client) -> f64 {
    admin
        .query_one(
            "SELECT COALESCE(EXTRACT(EPOCH FROM max(clock_timestamp() - query_start)) * 1000, 0)::float8
             FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0.0)
}

/// Two workers whose batches contend for the same 20 sequence keys for 60 s
/// (`GATEHOUSE_CONTEND_S`), one of them killed -9 five times: ledger jobs submitted in rounds
/// (each round numbers 1.. further on every key, shuffled), applied once each and in order;
/// PostgreSQL broke no deadlock (`pg_stat_database.deadlocks` of the database) and no
/// transaction waited 2 s for a lock (`pg_stat_activity`, sampled every 50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_batches_contending_for_20_keys_under_kill_9_never_deadlock() {
    let _serial = SERIAL.lock().await;
    let secs = env_size("GATEHOUSE_CONTEND_S", 60) as u64;
    let (accounts, per_round) = (20, 10);
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        supervise_worker: true,
        postgres: true,
        workers: 2,
        ..Options::default()
    })
    .await;
    let gatehouse_storage::Location::Postgres(pg) = sys.storage() else { unreachable!() };
    let admin = gatehouse_e2e::admin_connection(&pg.url, pg.password.as_deref().unwrap()).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut longest = 0f64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                longest = longest.max(longest_lock_wait_ms(&admin).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (longest, admin)
        })
    };
    let seed = 0xc0_47e5d_u64;
    let killer = {
        let (workers, stop) = (sys.worker_processes().to_vec(), stop.clone());
        tokio::spawn(async move {
            let mut rng = Rng(seed ^ 0xdead);
            let mut kills = 0;
            while kills < 5 && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(secs * 1000 / 6)).await;
                let victim = &workers[rng.below(workers.len() as u64) as usize];
                victim.kill();
                victim.start();
                kills += 1;
            }
            kills
        })
    };
    let mut rng = Rng(seed);
    let (mut jobs, mut model_ids, mut unavailable) = (Vec::new(), HashMap::new(), 0);
    let began = Instant::now();
    let mut rounds = 0u64;
    while began.elapsed() < Duration::from_secs(secs) {
        let (round, order) = ledger_model(accounts * per_round, accounts, "ct", &mut rng);
        let offset = jobs.len();
        let bodies: Vec<Value> = order
            .iter()
            .map(|&i| LedgerJob { number: round[i].number + rounds * per_round as u64, ..round[i].clone() })
            .map(|j| j.body())
            .collect();
        jobs.extend(
            round.iter().map(|j| LedgerJob { number: j.number + rounds * per_round as u64, ..j.clone() }),
        );
        let (ids, u) = submit_all(&sys, bodies, 8).await;
        model_ids.extend(ids.into_iter().map(|(pos, id)| (offset + order[pos], id)));
        unavailable += u;
        rounds += 1;
    }
    let submitting = began.elapsed();
    let per_account = rounds * per_round as u64;
    let drained = wait_ledger(&sys, Duration::from_secs(180), |l| {
        l.len() == accounts && l.values().all(|(_, s)| *s == per_account)
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let kills = killer.await.unwrap();
    let (longest_wait_ms, admin) = sampler.await.unwrap();
    // Statistics reach pg_stat_database within a second or so of a transaction's end.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadlocks: i64 = admin
        .query_one("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &model_ids);
    report(&format!(
        "FAULT postgres 2 workers' batches on the same 20 keys for {:.0} s, kill -9 x{kills} (seed={seed:#x}): \
         submitted={} accepted={} applied={applied} lost={lost} duplicated={duplicated} \
         order_violations={violations} deadlocks={deadlocks} longest_lock_wait_ms={longest_wait_ms:.0} \
         worker_starts={:?} 503s={unavailable}",
        submitting.as_secs_f64(),
        jobs.len(),
        model_ids.len(),
        starts(&sys),
    ));
    assert!(drained, "not everything was applied; first worker's log:\n{}", sys.worker_process().log());
    assert_eq!((applied, lost, duplicated, violations), (jobs.len(), 0, 0, 0));
    assert_eq!(deadlocks, 0, "PostgreSQL broke deadlocks");
    assert!(longest_wait_ms < 2000.0, "a transaction waited {longest_wait_ms:.0} ms for a lock");
    assert!(kills >= 5, "only {kills} kills happened during the load");
    sys.stop().await;
}

/// Whether a TCP connection from test host namespace `ns` to `addr:port` opens (within 3 s).
fn connects_from(ns: &str, addr: &str, port: u16) -> bool {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "3", "bash", "-c", &format!("exec 3<>/dev/tcp/{addr}/{port}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A component's process on its test host, killed when dropped.
struct OnHost(std::process::Child);

impl Drop for OnHost {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Separate hosts for real, wired like the compose networks: the broker (host 1), the
/// gatekeeper (host 2), the worker (host 3) and PostgreSQL (host 4) each in a network namespace
/// of its own. Network 1 ("broker") joins hosts 1–3, network 2 ("storage") hosts 3–4, network 3
/// ("public") the gatekeeper and this machine, where the client is. A job runs end to end over
/// those links; the gatekeeper's host cannot reach PostgreSQL's port, the worker's can.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gatekeeper_worker_broker_and_postgres_on_separate_hosts() {
    use gatehouse_devenv::cluster::Cluster;
    use gatehouse_devenv::hosts::Hosts;
    use gatehouse_devenv::postgres_node::PostgresNode;

    let _serial = SERIAL.lock().await;
    let dir = tempfile::TempDir::new().unwrap();
    let base = dir.path().to_owned();
    let (cluster, pg) = tokio::task::spawn_blocking(move || {
        let hosts =
            Hosts::wired(4, &[&[1, 2, 3], &[3, 4], &[2]]).expect("test hosts (needs root and iproute2)");
        let pg = PostgresNode::at(&base.join("postgres"), &hosts.addr(4), 5432, Some(&hosts.namespace(4)));
        let _ = pg.destroy();
        pg.ensure(Some("10.77.2.0/24")).expect("postgres on its host");
        let cluster = Cluster::single_on(&base.join("broker"), hosts).expect("broker on its host");
        (cluster, pg)
    })
    .await
    .unwrap();
    let hosts = cluster.hosts().unwrap();
    let (broker, gatekeeper, postgres) = (hosts.addr(1), hosts.addr_on(3, 2), hosts.addr(4));
    assert_eq!((broker.as_str(), postgres.as_str()), ("10.77.1.11", "10.77.2.14"));

    let certs = dir.path().join("certs");
    gatehouse_devenv::certs::write_dev_for(&certs, &[gatekeeper.parse().unwrap()]).unwrap();
    let password = certs.join("postgres.password");
    std::fs::write(&password, pg.password().unwrap()).unwrap();
    let cert = |name: &str| certs.join(name).display().to_string();
    let root = gatehouse_e2e::repo_root();
    let broker_url = format!("amqp://guest:guest@{broker}:5672/%2f");
    let spawn = |host: usize, binary: &str, config: &str, env: Vec<(String, String)>, log: &str| {
        let log = std::fs::File::create(dir.path().join(log)).unwrap();
        let mut cmd = hosts.command(host, std::path::Path::new(binary));
        cmd.arg(root.join(config)).current_dir(&root).envs(env).env("RUST_LOG", "info,lapin=warn");
        cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        OnHost(cmd.spawn().unwrap())
    };
    let e = |k: &str, v: String| (k.to_owned(), v);
    let _worker = spawn(
        3,
        env!("CARGO_BIN_EXE_e2e-worker"),
        "config/worker.toml",
        vec![
            e("WORKER__BROKER__URL", broker_url.clone()),
            e("WORKER__BROKER__PREFIX", "hosts.".into()),
            e("WORKER__STORAGE__URL", pg.url("postgres")),
            // The private test network; plaintext written explicitly (the TLS path is
            // storage.rs's and the compose file's).
            e("WORKER__STORAGE__TLS", "off".into()),
            e("WORKER__STORAGE__PASSWORD_FILE", password.display().to_string()),
            e("WORKER__KEYS__SEALING_KEY", cert("worker-sealing.key")),
            e("WORKER__KEYS__GATEKEEPER_SIGNING_KEYS", cert("gatekeeper-signing.pub")),
            e("WORKER__KEYS__OPERATOR_KEYS", cert("operator-signing.pub")),
            e("WORKER__KEYS__DATA_KEYRING", cert("worker-data.keys")),
            e("WORKER__ADMIN__LISTEN", "127.0.0.1:0".into()),
        ],
        "worker.log",
    );
    let _gatekeeper = spawn(
        2,
        env!("CARGO_BIN_EXE_e2e-gatekeeper"),
        "config/gatekeeper.toml",
        vec![
            e("GATEKEEPER__SERVER__LISTEN", format!("{gatekeeper}:8443")),
            e("GATEKEEPER__BROKER__URL", broker_url),
            e("GATEKEEPER__BROKER__PREFIX", "hosts.".into()),
            e("GATEKEEPER__TLS__CERT", cert("server.pem")),
            e("GATEKEEPER__TLS__KEY", cert("server.key")),
            e("GATEKEEPER__TLS__CLIENT_CA", cert("ca.pem")),
            e("GATEKEEPER__IDS__SECRET_FILE", cert("gatekeeper-ids.secret")),
            e("GATEKEEPER__KEYS__SIGNING_KEY", cert("gatekeeper-signing.key")),
            e("GATEKEEPER__KEYS__WORKER_SEALING_KEY", cert("worker-sealing.pub")),
            e("GATEKEEPER__ADMIN__LISTEN", "127.0.0.1:0".into()),
        ],
        "gatekeeper.log",
    );

    // The client, on this machine (the public network), through mutual TLS.
    let identity =
        gatehouse_client::Identity { cert: certs.join("client.pem"), key: certs.join("client.key") };
    let client = gatehouse_client::Client::new(
        &format!("https://{gatekeeper}:8443"),
        &certs.join("ca.pem"),
        Some(identity),
    )
    .unwrap();
    let logs = || {
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        format!("worker:\n{}\ngatekeeper:\n{}", read("worker.log"), read("gatekeeper.log"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = loop {
        if let Ok(mut c) = client.connect().await
            && c.request(gatehouse_client::Method::GET, "/readyz", &[], Vec::new())
                .await
                .is_ok_and(|r| r.status == 200)
        {
            break c;
        }
        assert!(Instant::now() < deadline, "the gatekeeper did not become ready\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let job = json!({"kind": "ledger.apply", "payload": {"account": "hosts-1", "amount": 42},
                     "sequence": {"key": "hosts-1", "number": 1}});
    let res = conn.submit(&job, Some(10)).await.unwrap();
    assert_eq!(res.status, 200, "{}\n{}", res.text(), logs());
    let body = res.json();
    assert_eq!(
        (body["status"].as_str(), &body["result"]["balance"]),
        (Some("succeeded"), &json!(42)),
        "{body}"
    );

    // It was recorded in PostgreSQL on host 4 (read from this machine, on the storage network).
    let id = body["id"].as_str().unwrap().to_owned();
    let db = gatehouse_e2e::admin_connection(&pg.url("postgres"), &pg.password().unwrap()).await;
    let state: String = db.query_one("SELECT state FROM jobs WHERE id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(state, "succeeded");

    // The wiring: the gatekeeper's host reaches the broker and nothing else; the worker's
    // reaches the broker and PostgreSQL.
    let (g, w) = (hosts.namespace(2), hosts.namespace(3));
    let reach = tokio::task::spawn_blocking(move || {
        [
            connects_from(&g, "10.77.1.11", 5672),
            connects_from(&g, "10.77.2.14", 5432),
            connects_from(&w, "10.77.1.11", 5672),
            connects_from(&w, "10.77.2.14", 5432),
        ]
    })
    .await
    .unwrap();
    report(&format!(
        "HOSTS broker 10.77.1.11, gatekeeper 10.77.1.12 + 10.77.3.12 (public), worker 10.77.1.13 + 10.77.2.13, \
         postgres 10.77.2.14: job {id} succeeded end to end; gatekeeper->broker={} gatekeeper->postgres={} \
         worker->broker={} worker->postgres={}",
        reach[0], reach[1], reach[2], reach[3]
    ));
    assert_eq!(
        reach,
        [true, false, true, true],
        "gatekeeper->broker, gatekeeper->postgres, worker->broker, worker->postgres"
    );
    drop(conn);
    drop(_gatekeeper);
    drop(_worker);
    let _ = tokio::task::spawn_blocking(move || pg.destroy()).await;
    drop(cluster);
}

/// Across three worker processes sharing PostgreSQL, a singleton kind still runs one job at a
/// time: the turns are in storage, and no two runs' intervals overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_singleton_kind_runs_one_at_a_time_across_three_workers_on_postgres() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        workers: 3,
        testing: true,
        postgres: true,
        prefetch: Some(8),
        ..Options::default()
    })
    .await;
    let ids =
        gatehouse_e2e::submit_at_once(&sys, &json!({"kind": "test.singleton", "payload": {"ms": 40}}), 30)
            .await;
    let mut runs = Vec::new();
    for id in ids {
        let s = wait_final(&mut sys.connect().await, &id, Duration::from_secs(60)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
        assert_eq!(s["result"]["attempt"], 1, "waiting used up an attempt: {s}");
        runs.push((
            s["result"]["started_at_ms"].as_u64().unwrap(),
            s["result"]["ended_at_ms"].as_u64().unwrap(),
        ));
    }
    runs.sort_unstable();
    for pair in runs.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two runs overlapped: {pair:?}");
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_on_postgres_fire_each_schedule_firing_once_and_never_overlap() {
    let _serial = SERIAL.lock().await;
    schedules_scenario::fire_each_firing_once(true).await;
}

/// PostgreSQL turns read-only (`default_transaction_read_only` on the worker's database, its
/// connections cut so that new ones get it) while jobs keep coming: the worker says so once,
/// turns `/readyz` to 503, takes no jobs but answers status reads, and when the database takes
/// writes again resumes and applies every job once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_postgres_pauses_the_worker_quietly_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        postgres: true,
        ..Options::default()
    })
    .await;
    let gatehouse_storage::Location::Postgres(pg) = sys.storage() else { unreachable!("postgres: true") };
    let db = pg.url.rsplit('/').next().and_then(|d| d.split('?').next()).expect("a database name").to_owned();
    let server = pg.url.replace(&format!("/{db}"), "/postgres");
    let admin = gatehouse_e2e::admin_connection(&server, pg.password.as_deref().expect("a password")).await;
    let read_only = |on: bool| {
        let (admin, db) = (&admin, db.clone());
        async move {
            admin
                .batch_execute(&format!("ALTER DATABASE {db} SET default_transaction_read_only = {on}"))
                .await
                .expect("alter database");
            // Sessions keep the setting they started with: cut them, new ones get it.
            admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&db],
                )
                .await
                .expect("terminate sessions");
        }
    };
    let seen = refusal::storage_refuses_writes(
        &sys,
        "read-only PostgreSQL (default_transaction_read_only, sessions cut)",
        read_only(true),
        read_only(false),
    )
    .await;
    seen.assert_held();
    sys.stop().await;
}
