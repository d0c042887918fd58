//! Executable kinds (`[kind.exec]`, oneshot) through the real gatekeeper, broker and worker
//! process: a Python handler succeeds, retries then dead-letters after exactly max_attempts,
//! fails with its stderr line, is killed with its grandchild at the timeout, sees none of the
//! worker's environment, and keeps its stderr out of the worker's log.

use std::time::{Duration, Instant};

use gatehouse_cli::commands::dlq::{self, BrokerArgs};
use gatehouse_e2e::{
    Options, TestSystem, broker_url, exec_catalog, marker, processes_with, repo_root, wait_final,
};
use serde_json::{Value, json};

async fn exec_system() -> TestSystem {
    TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        catalog: Some(exec_catalog()),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executable_kinds_run_isolated_and_end_as_their_exit_status_says() {
    let sys = exec_system().await;
    let mut conn = sys.connect().await;
    let mut submit = async |kind: &str, payload: Value| {
        let res = conn.submit(&json!({"kind": kind, "payload": payload}), None).await.unwrap();
        assert_eq!(res.status, 202, "{}", res.text());
        res.json()["id"].as_str().unwrap().to_owned()
    };
    let secret = marker();
    let hang_marker = marker();
    let upper = submit("acme.upper", json!({"text": "hello"})).await;
    let retry = submit("acme.retry", json!({})).await;
    let fail = submit("acme.fail", json!({})).await;
    let env = submit("acme.env", json!({})).await;
    let leak = submit("acme.leak", json!({"secret": secret})).await;
    let hang = submit("acme.hang", json!({"marker": hang_marker})).await;

    let mut conn = sys.connect().await;
    let s = wait_final(&mut conn, &upper, Duration::from_secs(20)).await;
    assert_eq!((s["status"].as_str(), &s["result"]), (Some("succeeded"), &json!({"upper": "HELLO"})), "{s}");

    let s = wait_final(&mut conn, &fail, Duration::from_secs(20)).await;
    assert_eq!(s["status"], "failed", "{s}");
    assert_eq!(s["error"], "exit 1: boom: the input makes no sense", "{s}");

    let s = wait_final(&mut conn, &env, Duration::from_secs(20)).await;
    let keys: Vec<&str> =
        s["result"]["env"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    // Given: PATH, LANG and the job's four. (An interpreter's launcher, such as a pyenv shim,
    // may add its own.) Never anything of the worker's: it runs with RUST_LOG and HOME set.
    for given in
        ["GATEHOUSE_ATTEMPT", "GATEHOUSE_CLIENT", "GATEHOUSE_JOB_ID", "GATEHOUSE_KIND", "LANG", "PATH"]
    {
        assert!(keys.contains(&given), "{given} missing: {keys:?}");
    }
    let leaked: Vec<&&str> = keys
        .iter()
        .filter(|k| {
            ["RUST_LOG", "HOME", "USER", "TMPDIR"].contains(k)
                || k.starts_with("WORKER__")
                || k.starts_with("CARGO")
        })
        .collect();
    assert!(leaked.is_empty(), "the worker's environment reached the child: {leaked:?}");
    // Its private folder, in its sandbox (see sandbox.rs).
    assert_eq!(s["result"]["cwd"], "/job", "{s}");

    let s = wait_final(&mut conn, &leak, Duration::from_secs(20)).await;
    assert_eq!(s["status"], "succeeded", "{s}");

    // Exit 75: retried, dead-lettered after exactly max_attempts (3).
    let s = wait_final(&mut conn, &retry, Duration::from_secs(30)).await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("dead_lettered"), Some("max_attempts")),
        "{s}"
    );
    let args = BrokerArgs { broker: broker_url(), prefix: sys.prefix.clone() };
    let letters = dlq::list(&args).await.unwrap();
    let letter = letters.iter().find(|l| l["id"] == retry.as_str()).expect("its dead letter");
    assert_eq!(letter["attempts"], 3, "{letter}");

    // Past its timeout: killed with its grandchild, nothing left running.
    let s = wait_final(&mut conn, &hang, Duration::from_secs(30)).await;
    assert_eq!(s["status"], "dead_lettered", "{s}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(&hang_marker).is_empty() {
        assert!(Instant::now() < deadline, "left behind: {:?}", processes_with(&hang_marker));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // stderr stays out of the worker's log (log_stderr is off).
    let log = sys.worker_process().log();
    assert!(!log.contains(&secret), "the child's stderr reached the worker's log");
    sys.stop().await;
}

#[test]
fn a_missing_program_or_an_unknown_mode_refuses_to_start_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(exec_catalog()).unwrap();
    for (name, broken, says) in [
        (
            "missing",
            base.replace(r#"["python3", "./handler.py", "upper"]"#, r#"["./no-such-program"]"#),
            "not an executable file",
        ),
        ("mode", base.replacen("[kind.exec]\n", "[kind.exec]\nmode = \"forking\"\n", 1), "mode"),
    ] {
        let catalog = repo_root().join(format!("tests/e2e/fixtures/exec/broken-{name}.toml"));
        std::fs::write(&catalog, broken).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-worker"))
            .current_dir(repo_root())
            .arg("config/worker.toml")
            .env("WORKER__CATALOG__PATH", &catalog)
            .env("WORKER__STORAGE__URL", format!("sqlite:{}", dir.path().join("db.sqlite").display()))
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&catalog);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: {stderr}");
    }
}

/// The stream processes of this test binary's catalog (their command line names stream.py).
fn stream_processes() -> Vec<String> {
    processes_with("fixtures/exec/stream.py")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_kind_reuses_its_processes_replaces_a_dead_one_and_leaves_no_orphan() {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        catalog: Some(exec_catalog()),
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    let mut tokens = std::collections::HashSet::new();
    for i in 0..20 {
        let res = conn
            .submit(&json!({"kind": "acme.stream", "payload": {"text": format!("job {i}")}}), Some(10))
            .await
            .unwrap();
        let body = res.json();
        assert_eq!(body["result"]["upper"], format!("JOB {i}"), "{body}");
        tokens.insert(body["result"]["token"].as_str().unwrap().to_owned());
    }
    assert!(tokens.len() <= 2, "a process per job instead of a pool of two: {tokens:?}");

    // A job whose process dies counts an attempt each time, and is dead-lettered after exactly
    // max_attempts; the pool recovers for the next job.
    let res = conn.submit(&json!({"kind": "acme.stream", "payload": {"crash": true}}), None).await.unwrap();
    let crash = res.json()["id"].as_str().unwrap().to_owned();
    let s = wait_final(&mut sys.connect().await, &crash, Duration::from_secs(30)).await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("dead_lettered"), Some("max_attempts")),
        "{s}"
    );
    let args = BrokerArgs { broker: broker_url(), prefix: sys.prefix.clone() };
    let letters = dlq::list(&args).await.unwrap();
    assert_eq!(letters.iter().find(|l| l["id"] == crash.as_str()).unwrap()["attempts"], 3);
    let mut conn = sys.connect().await;
    let res =
        conn.submit(&json!({"kind": "acme.stream", "payload": {"fail": true}}), Some(10)).await.unwrap();
    assert_eq!(
        (res.json()["status"].as_str(), res.json()["error"].as_str()),
        (Some("failed"), Some("cannot do that"))
    );
    let res =
        conn.submit(&json!({"kind": "acme.stream", "payload": {"text": "again"}}), Some(10)).await.unwrap();
    assert_eq!(res.json()["result"]["upper"], "AGAIN");

    // kill -9 of the worker while a stream process runs a job: the process goes with it, and
    // the job is not lost (the restarted worker runs it).
    let res = conn
        .submit(&json!({"kind": "acme.stream", "payload": {"sleep": 2, "text": "slow"}}), None)
        .await
        .unwrap();
    let slow = res.json()["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before: Vec<String> =
        stream_processes().iter().map(|p| p.split(':').next().unwrap().to_owned()).collect();
    assert!(!before.is_empty(), "no stream process is running");
    sys.worker_process().kill();
    // The old worker's stream processes die with it (the restarted worker starts its own).
    let deadline = Instant::now() + Duration::from_secs(5);
    while before.iter().any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()) {
        assert!(
            Instant::now() < deadline,
            "orphans of the killed worker: {before:?} {:?}",
            stream_processes()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sys.worker_process().start();
    let s = wait_final(&mut sys.connect().await, &slow, Duration::from_secs(30)).await;
    assert_eq!(s["result"]["upper"], "SLOW", "{s}");
    sys.stop().await;
}

/// The README's executable-kind example (examples/exec-kinds) works as shipped, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shipped_executable_examples_run_in_both_modes() {
    let sys = TestSystem::start_with(Options {
        catalog: Some(repo_root().join("examples/exec-kinds/jobs.toml")),
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    for kind in ["acme.upper", "acme.upper-stream"] {
        let res = conn.submit(&json!({"kind": kind, "payload": {"text": "Ada"}}), Some(10)).await.unwrap();
        assert_eq!(res.json()["result"], json!({"upper": "ADA"}), "{kind}: {}", res.text());
    }
    // The served API document knows the kinds added to the catalog, with their payload schema.
    let res = conn.request(gatehouse_client::Method::GET, "/openapi.json", &[], Vec::new()).await.unwrap();
    let doc: Value = serde_json::from_slice(&res.body).unwrap();
    let submit = &doc["components"]["schemas"]["SubmitRequest"];
    assert!(submit["properties"]["kind"]["enum"].as_array().unwrap().contains(&json!("acme.upper-stream")));
    let variant = submit["oneOf"].as_array().unwrap().iter().find(|v| v["title"] == "acme.upper").unwrap();
    assert_eq!(variant["properties"]["payload"]["allOf"][0]["required"], json!(["text"]), "{variant}");
    sys.stop().await;
}
