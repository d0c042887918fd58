//! The sandbox of executable kinds, tried as an attacker's code inside a job would: it cannot
//! read the worker's keys, database or config, nor see or signal the worker or another client's
//! job, nor reach the network; its process tree ends with the attempt; disk, stderr and
//! processes are bounded; stream processes serve one client each, and waiting for one is not
//! part of an attempt.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use gatehouse_e2e::{
    OTHER_CLIENT, Options, TestSystem, exec_catalog, marker, processes_with, repo_root, wait_final,
};
use serde_json::{Value, json};

async fn exec_system() -> TestSystem {
    TestSystem::start_with(Options { catalog: Some(exec_catalog()), ..Options::default() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_executable_job_reaches_nothing_of_the_worker_nor_of_another_clients_job() {
    // A root worker (this process): its jobs run under client uids of their own.
    let sys = exec_system().await;
    probe_from_two_clients(&sys, std::process::id()).await;
    sys.stop().await;
}

/// The same with the worker as an unprivileged user, as in the container: its jobs keep its uid
/// in user namespaces of their own, and still reach nothing of it or of each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_non_root_workers_jobs_reach_nothing_of_it_nor_of_each_other() {
    // Its binary, catalog, schemas and handlers where that user can read them, as an install
    // would put them (the checkout may sit below a folder only root can enter).
    let dir = tempfile::Builder::new().prefix("gatehouse-nonroot-").tempdir_in("/tmp").unwrap();
    let catalog = copy_exec_fixtures(dir.path());
    let binary = dir.path().join("e2e-worker");
    std::fs::copy(env!("CARGO_BIN_EXE_e2e-worker"), &binary).unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).chain([dir.path().into()])
    {
        std::os::unix::fs::chown(entry, Some(65534), Some(65534)).unwrap();
    }
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(Box::leak(binary.display().to_string().into_boxed_str())),
        worker_uid: Some(65534),
        catalog: Some(catalog),
        ..Options::default()
    })
    .await;
    let pid = sys.worker_process().pid().expect("the worker runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_owned();
    assert!(uid.split_whitespace().nth(1) == Some("65534"), "the worker is not unprivileged: {uid}");
    probe_from_two_clients(&sys, pid).await;
    sys.stop().await;
}

/// Two clients' probes, one while the other runs: neither reads the worker's secrets, sees or
/// signals it (`worker_pid`), reaches the network, or sees the other's files or environment.
async fn probe_from_two_clients(sys: &TestSystem, worker_pid: u32) {
    let secrets = [
        sys.certs.path().join("worker-sealing.key"),
        sys.keyring(),
        sys.database(),
        repo_root().join("config/worker.toml"),
        exec_catalog(),
        std::path::PathBuf::from(format!("/proc/{worker_pid}/environ")),
    ];
    let paths: Vec<String> = secrets.iter().map(|p| p.display().to_string()).collect();
    let (mark_a, mark_b) = (marker(), marker());
    let probe = |mark: &str, hold: f64| {
        json!({"kind": "acme.probe", "payload": {
            "paths": paths, "mark": mark, "hold": hold, "pid": worker_pid, "port": 5672,
        }})
    };
    // Client A's job holds on while client B's runs beside it.
    let mut a = sys.connect().await;
    let res = a.submit(&probe(&mark_a, 3.0), None).await.unwrap();
    assert_eq!(res.status, 202, "{}", res.text());
    let id_a = res.json()["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut b = sys.client_as(OTHER_CLIENT).connect().await.unwrap();
    let res = b.submit(&probe(&mark_b, 0.0), Some(20)).await.unwrap();
    let rb = res.json();
    assert_eq!(rb["status"], "succeeded", "{rb}");
    let ra = wait_final(&mut sys.connect().await, &id_a, Duration::from_secs(30)).await;
    assert_eq!(ra["status"], "succeeded", "{ra}");
    let id_b = rb["id"].as_str().unwrap();

    for (who, r, other_mark, other_id) in [("A", &ra, &mark_b, id_b), ("B", &rb, &mark_a, id_a.as_str())] {
        let r = &r["result"];
        for p in &paths {
            assert_ne!(r["paths"][p], "read", "{who}'s job read {p}: {r}");
        }
        let pids: Vec<u64> = r["pids"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
        assert!(!pids.contains(&u64::from(worker_pid)), "{who} sees the worker's process: {pids:?}");
        assert!(pids.len() <= 4, "{who} sees processes beyond its own: {pids:?}");
        let environs = r["environs"].to_string();
        assert!(!environs.contains(other_id), "{who} read the other client's job environment");
        assert!(
            !environs.contains("CARGO") && !environs.contains("RUST"),
            "{who} read the worker's environment"
        );
        let listing = r["listing"].to_string();
        assert!(!listing.contains(other_mark.as_str()), "{who} sees the other client's files: {listing}");
        assert_ne!(r["net"], "connected", "{who} reached the broker's port");
        assert_eq!(r["kill"], "ProcessLookupError", "{who} could name the worker to signal it: {r}");
        assert_eq!(r["cwd"], "/job", "{r}");
    }
    assert_ne!(ra["result"]["uid"], rb["result"]["uid"], "two clients' jobs share a uid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_s_whole_process_tree_ends_with_it_even_a_setsid_grandchild_ignoring_sigterm() {
    let sys = exec_system().await;
    let mut conn = sys.connect().await;
    let marker = marker();
    let res =
        conn.submit(&json!({"kind": "acme.escape", "payload": {"marker": marker}}), Some(20)).await.unwrap();
    assert_eq!(res.json()["status"], "succeeded", "{}", res.text());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(&marker).is_empty() {
        assert!(Instant::now() < deadline, "outlived its job: {:?}", processes_with(&marker));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_stderr_and_processes_are_bounded_per_job_with_a_clear_reason() {
    let sys = exec_system().await;
    let mut conn = sys.connect().await;
    let mut run = async |kind: &str, payload: Value| {
        let res = conn.submit(&json!({"kind": kind, "payload": payload}), Some(30)).await.unwrap();
        res.json()
    };
    // 16 MiB into a folder of 4: no space left, failed with the child's own words.
    let r = run("acme.disk", json!({"mb": 16})).await;
    assert_eq!(
        (r["status"].as_str(), r["error"].as_str()),
        (Some("failed"), Some("exit 1: disk: No space left on device")),
        "{r}"
    );
    // 256 MiB of stderr without a newline: stopped past 1 MiB, not read into memory.
    let started = Instant::now();
    let r = run("acme.flood", json!({"mb": 256})).await;
    assert_eq!(
        (r["status"].as_str(), r["error"].as_str()),
        (Some("failed"), Some("stderr over 1048576 bytes")),
        "{r}"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "the flood ran on: {:?}", started.elapsed());
    // Forks past limits.processes (32) fail.
    let r = run("acme.bomb", json!({"n": 500})).await;
    assert_eq!(r["status"], "succeeded", "{r}");
    let forked = r["result"]["forked"].as_u64().unwrap();
    assert!(forked < 32, "{forked} processes forked under a limit of 32");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_processes_serve_one_client_each_and_waiting_for_one_is_not_part_of_an_attempt() {
    let sys = exec_system().await;
    let mut a = sys.connect().await;
    let mut b = sys.client_as(OTHER_CLIENT).connect().await.unwrap();
    let mut tokens: [HashSet<String>; 2] = Default::default();
    for i in 0..6 {
        for (n, (conn, client)) in [(&mut a, "dev-client"), (&mut b, OTHER_CLIENT)].into_iter().enumerate() {
            let job = json!({"kind": "acme.stream", "payload": {"text": format!("job {i}")}});
            let r = conn.submit(&job, Some(10)).await.unwrap().json();
            assert_eq!(r["result"]["upper"], format!("JOB {i}"), "{r}");
            assert_eq!(r["result"]["client"], client, "a process of another client answered: {r}");
            tokens[n].insert(r["result"]["token"].as_str().unwrap().to_owned());
        }
    }
    assert!(tokens[0].is_disjoint(&tokens[1]), "clients shared a stream process: {tokens:?}");
    assert!(tokens[0].len() <= 2 && tokens[1].len() <= 2, "a process per job instead of a pool: {tokens:?}");

    // One slot for every client, a 2 s timeout: A's three 1.2 s jobs hold it for ~3.6 s, and
    // B's job, waiting behind them, still runs on its first attempt.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let job = json!({"kind": "acme.stream-one", "payload": {"sleep": 1.2, "text": "a"}});
        ids.push(a.submit(&job, None).await.unwrap().json()["id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let job = json!({"kind": "acme.stream-one", "payload": {"text": "b"}});
    let r = b.submit(&job, None).await.unwrap().json();
    let id_b = r["id"].as_str().unwrap().to_owned();
    // (Fresh connections: an idle one is closed by the gatekeeper's header read timeout.)
    let r =
        wait_final(&mut sys.client_as(OTHER_CLIENT).connect().await.unwrap(), &id_b, Duration::from_secs(30))
            .await;
    assert_eq!((r["status"].as_str(), &r["result"]["attempt"]), (Some("succeeded"), &json!(1)), "{r}");
    for id in ids {
        let r = wait_final(&mut sys.connect().await, &id, Duration::from_secs(30)).await;
        assert_eq!((r["status"].as_str(), &r["result"]["attempt"]), (Some("succeeded"), &json!(1)), "{r}");
    }
    sys.stop().await;
}

#[test]
fn an_unconfined_sandbox_is_refused_outside_testing_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-worker"))
        .current_dir(repo_root())
        .arg("config/worker.toml")
        .env("WORKER__CATALOG__PATH", exec_catalog())
        .env("WORKER__STORAGE__URL", format!("sqlite:{}", dir.path().join("db.sqlite").display()))
        .env("WORKER__SANDBOX__MODE", "none")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("mode = \"none\"") && stderr.contains("testing"), "{stderr}");
}

/// An executable's error text can quote the payload: only the job's owner reads it (status),
/// never the worker's log, the dead letter's headers in the broker, or the database in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_text_reaches_the_owner_only() {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        catalog: Some(exec_catalog()),
        ..Options::default()
    })
    .await;
    let secret = marker();
    let mut conn = sys.connect().await;
    let r = conn
        .submit(&json!({"kind": "acme.secret-retry", "payload": {"secret": secret}}), None)
        .await
        .unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let s = wait_final(&mut sys.connect().await, &id, Duration::from_secs(30)).await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("dead_lettered"), Some("max_attempts")),
        "{s}"
    );
    assert_eq!(s["error"], format!("exit 75: cannot process {secret}"), "the owner reads why: {s}");

    let args = gatehouse_cli::commands::dlq::BrokerArgs {
        broker: gatehouse_e2e::broker_url(),
        prefix: sys.prefix.clone(),
    };
    let letters = gatehouse_cli::commands::dlq::list(&args).await.unwrap();
    let letter = letters.iter().find(|l| l["id"] == id.as_str()).expect("its dead letter");
    assert!(!letter.to_string().contains(&secret), "the broker holds the error text: {letter}");
    assert_eq!(letter["last_error"], "exit-status", "{letter}");
    let log = sys.worker_process().log();
    assert!(!log.contains(&secret), "the worker logged the error text");
    assert!(log.contains("exit-status"), "the log names no error class");
    let db = sys.database();
    sys.stop().await;
    for file in [db.clone(), db.with_extension("sqlite-wal")] {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds the error text",
            file.display()
        );
    }
}

/// Handlers installed below `/tmp` (a checkout there, as a CI runner may make) are reachable in
/// the sandbox, whose own `/tmp` is private: the grant is bound into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handlers_below_tmp_run_in_the_sandbox() {
    let dir = tempfile::Builder::new().prefix("gatehouse-handlers-").tempdir_in("/tmp").unwrap();
    let catalog = copy_exec_fixtures(dir.path());
    let sys = TestSystem::start_with(Options { catalog: Some(catalog), ..Options::default() }).await;
    let mut conn = sys.connect().await;
    for kind in ["acme.upper", "acme.stream"] {
        let r =
            conn.submit(&json!({"kind": kind, "payload": {"text": "tmp"}}), Some(20)).await.unwrap().json();
        assert_eq!(r["result"]["upper"], "TMP", "{kind}: {r}");
    }
    sys.stop().await;
}

/// The executable-kind fixtures, their catalog and the schemas it names, copied into `dir`;
/// answers the catalog's path.
fn copy_exec_fixtures(dir: &std::path::Path) -> std::path::PathBuf {
    let fixtures = repo_root().join("tests/e2e/fixtures/exec");
    for file in ["handler.py", "stream.py", "any.json"] {
        std::fs::copy(fixtures.join(file), dir.join(file)).unwrap();
    }
    for schema in std::fs::read_dir(repo_root().join("config/schemas")).unwrap().flatten() {
        std::fs::copy(schema.path(), dir.join(schema.file_name())).unwrap();
    }
    let catalog = std::fs::read_to_string(exec_catalog()).unwrap().replace("../../../../config/schemas/", "");
    std::fs::write(dir.join("jobs.toml"), catalog).unwrap();
    dir.join("jobs.toml")
}
