//! The README's first command, as a newcomer runs it: `gatehouse up` from the repository root
//! starts cleanly (no ERROR or WARN line, no colour codes when its output is not a terminal),
//! says it is up only once its worker consumes, answers a job, and stops on Ctrl-C; with a
//! worker that cannot start, it never says it is up.
//!
//! It builds and runs the real binaries (`cargo build --bins`, debug) and needs ports 8443 and
//! 9101 free, like `gatehouse up` itself.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse_client::{Client, Identity, Method};
use gatehouse_e2e::{broker_url, repo_root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatehouse_up_starts_quietly_runs_a_job_and_stops_on_ctrl_c() {
    // The shared test broker (started if needed) is the one `gatehouse up` finds and keeps.
    broker_url();
    let root = repo_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--quiet", "--bins", "-p", "gatehouse-cli", "-p", "gatehouse-gatekeeper"])
        .args(["-p", "gatehouse-worker"])
        .status()
        .expect("cargo runs");
    assert!(built.success(), "cargo build --bins failed");

    // A worker that refuses its configuration (exit 64): never "up", and `up` itself fails.
    let broken = Command::new(root.join("target/debug/gatehouse"))
        .current_dir(&root)
        .arg("up")
        .env_remove("RUST_LOG")
        .env("WORKER__STORAGE__URL", "mysql://nowhere")
        .stdin(Stdio::null())
        .output()
        .expect("gatehouse up runs");
    let said =
        String::from_utf8_lossy(&broken.stdout).into_owned() + &String::from_utf8_lossy(&broken.stderr);
    assert!(!broken.status.success(), "{said}");
    assert!(!said.contains("Gatehouse is up"), "said up with a worker that did not start:\n{said}");
    assert!(said.contains("worker 1 exited before it was ready"), "{said}");

    let log = tempfile::NamedTempFile::new().unwrap();
    let mut up = Command::new(root.join("target/debug/gatehouse"))
        .current_dir(&root)
        .arg("up")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("gatehouse up starts");
    let output = || {
        let mut s = String::new();
        log.reopen().unwrap().read_to_string(&mut s).unwrap();
        s
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !output().contains("Gatehouse is up.") {
        assert!(up.try_wait().unwrap().is_none(), "gatehouse up exited:\n{}", output());
        assert!(Instant::now() < deadline, "not up within 90 s:\n{}", output());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Up means up: the worker consumed before the banner.
    let out = output();
    let (consuming, banner) = (out.find("worker consuming"), out.find("Gatehouse is up."));
    assert!(
        consuming.is_some_and(|c| Some(c) < banner),
        "the banner came before the worker consumed:\n{out}"
    );

    // The banner's request, through the dev certificates it wrote.
    let certs = root.join("certs/dev");
    let identity = Identity { cert: certs.join("client.pem"), key: certs.join("client.key") };
    let client = Client::new("https://127.0.0.1:8443", &certs.join("ca.pem"), Some(identity)).unwrap();
    let mut conn = client.connect().await.unwrap();
    let body = br#"{"kind":"vault.put","payload":{"record":{"name":"Ada"}}}"#.to_vec();
    let headers = [("content-type", "application/json"), ("prefer", "wait=10")];
    let res = conn.request(Method::POST, "/v1/jobs", &headers, body).await.unwrap();
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    drop(conn);

    // Ctrl-C.
    Command::new("kill").args(["-INT", &up.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not stop within 60 s:\n{}", output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = output();
    assert!(status.success(), "gatehouse up exited with {status}:\n{out}");
    let noisy: Vec<&str> = out.lines().filter(|l| l.contains(" ERROR ") || l.contains(" WARN ")).collect();
    assert!(noisy.is_empty(), "ERROR/WARN lines in a normal start and stop:\n{}", noisy.join("\n"));
    assert!(!out.contains('\u{1b}'), "colour codes in output that is not a terminal:\n{out}");
    assert!(out.contains("worker stopped") && out.contains("gatekeeper stopped"), "{out}");
}

/// Started before its broker answers (a service manager restarting it during a broker restart,
/// or compose starting everything at once), the worker waits for the broker, saying so once,
/// instead of exiting; once the broker is there it declares the topology and runs jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_waits_for_a_broker_that_is_not_up_yet() {
    let real = broker_url();
    // A port where nothing answers yet; in two seconds it forwards to the real broker.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let forwarder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect("127.0.0.1:5672").await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    let late = real.replacen(":5672", &format!(":{port}"), 1);
    assert_ne!(late, real, "the test broker is expected on 127.0.0.1:5672");
    let sys = gatehouse_e2e::TestSystem::start_with(gatehouse_e2e::Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        broker_urls: Some((real.clone(), late)),
        ..Default::default()
    })
    .await;
    let mut conn = sys.connect().await;
    let res = conn
        .submit(&serde_json::json!({"kind": "vault.put", "payload": {"record": {"a": 1}}}), Some(10))
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", res.text());
    let log = sys.worker_process().log();
    assert_eq!(sys.worker_process().starts.load(std::sync::atomic::Ordering::SeqCst), 1, "{log}");
    assert_eq!(log.matches("does not answer yet").count(), 1, "said once:\n{log}");
    assert!(!log.contains("ERROR") && !log.contains(" WARN "), "{log}");
    forwarder.abort();
    sys.stop().await;
}
