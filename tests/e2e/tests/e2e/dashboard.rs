//! The worker's dashboard in a real browser (headless Chromium): it loads with no console
//! message at all (no script error, no refused resource), and shows a job that was just
//! dead-lettered with its reason, and nothing of its payload. Basic auth guards it when set.

use std::process::Command;
use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, management, wait_final};
use serde_json::json;

/// Loads `url` in headless Chromium, lets its scripts run, and answers (the DOM as rendered,
/// the browser's console lines). Saves a screenshot beside the build (never in the repo).
fn browse(url: &str) -> (String, Vec<String>) {
    let chromium = gatehouse_e2e::chromium();
    let profile = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium runs")
    };
    let out = run(&["--dump-dom"]);
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    let console = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(String::from)
        .collect();
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = run(&["--window-size=1280,900", &format!("--screenshot={}", shot.display())]);
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_a_job_just_dead_lettered_and_no_console_errors() {
    let sys = TestSystem::start_with(Options { testing: true, ..Options::default() }).await;
    let admin = sys.worker_admin_addr.expect("in-process worker");
    let mut conn = sys.connect().await;
    // Fails every time: dead-lettered after max_attempts (3).
    let r = conn.submit(&json!({"kind": "test.fail", "payload": {"times": 100}}), None).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_final(&mut conn, &id, Duration::from_secs(20)).await["status"], "dead_lettered");
    let ok = conn
        .submit(&json!({"kind": "vault.put", "payload": {"record": {"a": "PAYLOAD-MARKER-5150"}}}), Some(10))
        .await
        .unwrap();
    assert_eq!(ok.json()["status"], "succeeded");

    let url = format!("http://{admin}/");
    let (dom, console) = tokio::task::spawn_blocking(move || browse(&url)).await.unwrap();
    assert!(console.is_empty(), "console messages: {console:#?}");
    // Rendered by the script from /dashboard.json: the dead letter with its reason ...
    let row =
        dom.lines().find(|l| l.contains(&id)).unwrap_or_else(|| panic!("job {id} not on the page:\n{dom}"));
    assert!(row.contains("max_attempts") && row.contains("test.fail"), "{row}");
    // ... the queues with their depth, and the counts by kind.
    assert!(dom.contains(&sys.topology().job_queue("batch")), "{dom}");
    // Counted by kind and outcome: test.fail 0 succeeded, 0 failed, 1 dead-lettered.
    let n = |v: u32| format!(r#"<td class="n">{v}</td>"#);
    assert!(dom.contains(&format!("<td>test.fail</td><td>batch</td>{}{}{}", n(0), n(0), n(1))), "{dom}");
    assert!(dom.contains(&format!("<td>vault.put</td><td>interactive</td>{}", n(1))), "{dom}");
    assert!(dom.contains("consuming"), "{dom}");
    // Nothing paused; no pause buttons without the admin auth.
    assert!(dom.contains("<td>running</td></tr>"), "{dom}");
    assert!(!dom.contains("<button"), "{dom}");
    assert!(!dom.contains("PAYLOAD-MARKER-5150"), "a payload reached the dashboard");
    // The job id links to its state and transitions (metadata only).
    assert!(row.contains(&format!(r##"<a href="#job-{id}">{id}</a>"##)), "{row}");
    let url = format!("http://{admin}/#job-{id}");
    let (job_dom, console) = tokio::task::spawn_blocking(move || browse(&url)).await.unwrap();
    assert!(console.is_empty(), "console messages: {console:#?}");
    let title = format!("Job {id} · test.fail · dev-client · dead_lettered (max_attempts)");
    assert!(job_dom.contains(&title), "{job_dom}");
    for state in ["running", "retrying", "dead lettered"] {
        assert!(job_dom.contains(&format!("<td>{state}</td>")), "no {state} transition:\n{job_dom}");
    }
    let (status, _) = management::call_at(admin, "GET", "/jobs/0123456789abcdef0123456789abcdef", None).await;
    assert_eq!(status, 404);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_auth_guards_metrics_and_the_dashboard_but_not_the_probes() {
    let sys =
        TestSystem::start_with(Options { worker_admin_password: Some("s3cret-admin"), ..Options::default() })
            .await;
    let admin = sys.worker_admin_addr.expect("in-process worker");
    let good = format!("Basic {}", base64_of("ops:s3cret-admin"));
    let bad = format!("Basic {}", base64_of("ops:guess"));
    for path in ["/", "/dashboard.json", "/dashboard.js", "/metrics"] {
        assert_eq!(
            management::call_as(admin, "GET", path, None, None).await.0,
            401,
            "{path} without credentials"
        );
        assert_eq!(
            management::call_as(admin, "GET", path, None, Some(&bad)).await.0,
            401,
            "{path} wrong password"
        );
        assert_eq!(management::call_as(admin, "GET", path, None, Some(&good)).await.0, 200, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(management::call_as(admin, "GET", path, None, None).await.0, 200, "{path}");
    }
    sys.stop().await;
}

/// The dashboard pauses and resumes a kind only behind the admin auth, and only for requests
/// from its own page: a paused kind's job waits (`paused`), and runs once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_pauses_and_resumes_only_behind_the_admin_auth() {
    let open = TestSystem::start().await;
    let change = json!({"action": "pause", "target": "kind", "name": "vault.put"});
    let admin = open.worker_admin_addr.expect("in-process worker");
    let (status, body) = management::call_as(admin, "POST", "/pauses", Some(change.clone()), None).await;
    assert_eq!(status, 403, "no admin auth, no pausing: {body}");
    let snap: serde_json::Value =
        serde_json::from_str(&management::call_as(admin, "GET", "/dashboard.json", None, None).await.1)
            .unwrap();
    assert_eq!(snap["controls"], false, "{snap}");
    open.stop().await;

    let sys =
        TestSystem::start_with(Options { worker_admin_password: Some("s3cret-admin"), ..Options::default() })
            .await;
    let admin = sys.worker_admin_addr.expect("in-process worker");
    let good = format!("Basic {}", base64_of("ops:s3cret-admin"));
    let auth = ("authorization", good.clone());
    let post = |body: serde_json::Value, headers: Vec<(&'static str, String)>| async move {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        management::call_with(admin, "POST", "/pauses", Some(body), &headers).await
    };
    assert_eq!(post(change.clone(), vec![]).await.0, 401, "without credentials");
    let cross_site = post(change.clone(), vec![auth.clone(), ("sec-fetch-site", "cross-site".into())]).await;
    assert_eq!(cross_site.0, 403, "a request another site's page made: {}", cross_site.1);
    let unknown = json!({"action": "pause", "target": "kind", "name": "nope"});
    assert_eq!(post(unknown, vec![auth.clone()]).await.0, 422);
    let paused = post(change.clone(), vec![auth.clone(), ("sec-fetch-site", "same-origin".into())]).await;
    assert_eq!(paused, (200, r#"{"changed":true}"#.to_owned()));

    let mut conn = sys.connect().await;
    let r = conn.submit(&json!({"kind": "vault.put", "payload": {"record": {"a": 1}}}), None).await.unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while conn.status(&id).await.unwrap().json()["status"] != "paused" {
        assert!(std::time::Instant::now() < deadline, "the job was not held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snap = management::call_as(admin, "GET", "/dashboard.json", None, Some(&good)).await.1;
    let snap: serde_json::Value = serde_json::from_str(&snap).unwrap();
    assert_eq!(snap["controls"], true, "{snap}");
    assert_eq!(snap["paused"][0]["target"], "kind:vault.put", "{snap}");
    assert_eq!(snap["paused"][0]["held"], 1, "{snap}");

    let resume = json!({"action": "resume", "target": "kind", "name": "vault.put"});
    assert_eq!(post(resume, vec![auth]).await, (200, r#"{"changed":true,"released":1}"#.to_owned()));
    assert_eq!(wait_final(&mut conn, &id, Duration::from_secs(20)).await["status"], "succeeded");
    sys.stop().await;
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Both admin listeners answer a request for an address or `localhost`, not for a name a web
/// page could have pointed at 127.0.0.1 (DNS rebinding from a browser on the operator's machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_listeners_refuse_requests_for_unknown_host_names() {
    let sys = TestSystem::start().await;
    let worker = sys.worker_admin_addr.expect("in-process worker");
    for admin in [worker, sys.admin_addr] {
        for (host, status) in [
            (admin.to_string(), 200),
            (format!("localhost:{}", admin.port()), 200),
            (format!("rebind.attacker.example:{}", admin.port()), 421),
        ] {
            assert_eq!(
                management::status_for_host(admin, "/metrics", &host).await,
                status,
                "{admin} as {host}"
            );
        }
    }
    assert_eq!(management::status_for_host(worker, "/dashboard.json", "attacker.example").await, 421);
    sys.stop().await;
}
