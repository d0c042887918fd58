//! A request can be followed from the client's log to the worker's: the client's W3C
//! `traceparent` (or a fresh one) travels inside the vouched job, the gatekeeper's and the
//! worker's log lines for the job carry its trace id, and the response echoes it.

use std::time::Duration;

use gatehouse_client::Method;
use gatehouse_e2e::{Options, TestSystem};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_trace_id_goes_from_the_client_through_gatekeeper_and_worker_logs_and_back() {
    // The gatekeeper runs in this process: its log lines land here.
    let gatekeeper_log = gatehouse_e2e::captured_logs("debug,lapin=warn");
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        worker_log: Some("debug,lapin=warn"),
        ..Options::default()
    })
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut conn = sys.connect().await;
    let body = br#"{"kind":"vault.put","payload":{"record":{"a":1}}}"#.to_vec();
    let headers = [
        ("content-type", "application/json"),
        ("prefer", "wait=10"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ];
    let res = conn.request(Method::POST, "/v1/jobs", &headers, body.clone()).await.unwrap();
    assert_eq!(res.status, 200);
    let job: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
    let job_id = job["id"].as_str().unwrap().to_owned();
    let echoed = res.traceparent.clone().expect("the response carries traceparent");
    assert!(
        echoed.starts_with(&format!("00-{trace_id}-")) && !echoed.contains("00f067aa0ba902b7"),
        "{echoed}"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let gk = String::from_utf8_lossy(&gatekeeper_log.lock().unwrap()).into_owned();
    let gk_line = gk
        .lines()
        .find(|l| l.contains(&job_id))
        .unwrap_or_else(|| panic!("no gatekeeper line for the job:\n{gk}"));
    assert!(gk_line.contains(trace_id), "{gk_line}");
    let worker = sys.worker_process().log();
    let worker_lines: Vec<&str> = worker.lines().filter(|l| l.contains(&job_id)).collect();
    assert!(!worker_lines.is_empty(), "no worker line for the job:\n{worker}");
    assert!(worker_lines.iter().all(|l| l.contains(trace_id)), "{worker_lines:?}");

    // Without a traceparent, a fresh trace starts and is echoed.
    let res = conn.request(Method::POST, "/v1/jobs", &headers[..2], body).await.unwrap();
    let fresh = res.traceparent.clone().expect("a fresh traceparent");
    assert!(fresh.starts_with("00-") && !fresh.contains(trace_id), "{fresh}");
    sys.stop().await;
}
