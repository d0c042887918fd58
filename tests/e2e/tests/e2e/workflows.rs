//! Workflows and jobs that wait for others (`after`): a step runs once, only after every parent
//! is decided, and is given its parents' results inside the worker; a failed parent cancels its
//! children (and theirs) unless they run anyway; refused whole, read by their owner only; under
//! kill -9 of workers on PostgreSQL every step is decided once, none before its parents.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gatehouse_e2e::{OTHER_CLIENT, Options, TestSystem, assert_problem, oracle, wait_final};
use serde_json::{Value, json};

use super::batches::{Group, wait_complete};

fn step(name: &str, after: &[&str], ms: u64) -> Value {
    json!({"name": name, "after": after, "kind": "test.sleep", "payload": {"ms": ms}})
}

/// extract → three scorers at once → merge, beside a three-level chain.
fn fan_out_fan_in() -> Vec<Value> {
    vec![
        step("extract", &[], 150),
        step("score-a", &["extract"], 100),
        step("score-b", &["extract"], 200),
        step("score-c", &["extract"], 50),
        step("merge", &["score-a", "score-b", "score-c"], 10),
        step("chain-3", &["chain-2"], 10),
        step("chain-2", &["chain-1"], 10),
        step("chain-1", &[], 10),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workflow_runs_each_step_once_after_its_parents_given_their_results() {
    let sys = TestSystem::start_with(Options { testing: true, ..Default::default() }).await;
    let mut conn = sys.connect().await;
    let steps = fan_out_fan_in();
    let r = conn.submit_workflow(&steps).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let accepted = r.json();
    let id = accepted["id"].as_str().unwrap().to_owned();
    let ids: HashMap<String, String> = accepted["steps"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, id)| (name.clone(), id.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(ids.len(), 8, "{accepted}");
    // Its event stream, from the start: every step's transitions, then the whole status.
    let mut events = conn.workflow_events(&id, None).await.unwrap().expect("a stream");
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut last_id = None;
    let finished = loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.next()).await.unwrap().unwrap().unwrap();
        match e.event.as_str() {
            "step" => {
                let data = e.json();
                assert_eq!(data["id"].as_str(), ids.get(data["step"].as_str().unwrap()).map(String::as_str));
                seen.entry(data["step"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(data["status"].as_str().unwrap().to_owned());
                last_id = e.id.clone();
            }
            "workflow" => break e.json(),
            other => panic!("unexpected event {other}: {}", e.data),
        }
    };
    assert_eq!(finished["status"], "complete", "{finished}");
    assert_eq!(finished["counts"], json!({"succeeded": 8}), "{finished}");
    for (name, states) in &seen {
        assert_eq!(states.last().map(String::as_str), Some("succeeded"), "{name}: {states:?}");
    }
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert!(seen["merge"].contains(&"waiting_for_parents".to_owned()), "{:?}", seen["merge"]);
    let status = wait_complete(&mut conn, Group::Workflow, &id, Duration::from_secs(5)).await;
    let merge_after: Vec<&str> =
        status["steps"].as_array().unwrap().iter().find(|s| s["name"] == "merge").unwrap()["after"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
    assert_eq!(merge_after, ["score-a", "score-b", "score-c"], "{status}");

    // Each ran once, after every parent ended; merge was given its parents' results.
    let mut results = HashMap::new();
    for (name, job) in &ids {
        let s = wait_final(&mut conn, job, Duration::from_secs(5)).await;
        assert_eq!(s["status"], "succeeded", "{name}: {s}");
        results.insert(name.clone(), s["result"].clone());
    }
    for (child, body) in steps.iter().map(|s| (s["name"].as_str().unwrap(), s)) {
        for parent in body["after"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()) {
            assert!(
                results[child]["started_at_ms"].as_i64() >= results[parent]["ended_at_ms"].as_i64(),
                "{child} started before {parent} ended"
            );
        }
    }
    let given = results["merge"]["parents"].as_array().unwrap();
    let slept: Vec<(Value, Value)> =
        given.iter().map(|p| (p["status"].clone(), p["result"]["slept_ms"].clone())).collect();
    assert_eq!(
        slept,
        [(json!("succeeded"), json!(100)), (json!("succeeded"), json!(200)), (json!("succeeded"), json!(50))]
    );
    assert_eq!(results["extract"]["parents"], Value::Null, "a job without parents is given none");

    // Its steps are listed by workflow (and are no batch's); a stream resumed from its last
    // event has only the end to tell.
    let r =
        conn.request(hyper::Method::GET, &format!("/v1/jobs?workflow={id}"), &[], Vec::new()).await.unwrap();
    let listed = r.json()["jobs"].as_array().unwrap().len();
    assert_eq!(listed, 8, "{}", r.text());
    let r = conn.request(hyper::Method::GET, &format!("/v1/jobs?batch={id}"), &[], Vec::new()).await.unwrap();
    assert_eq!(r.json()["jobs"], json!([]), "{}", r.text());
    let mut resumed = conn.workflow_events(&id, last_id.as_deref()).await.unwrap().expect("a stream");
    let e = resumed.next().await.unwrap().unwrap();
    assert_eq!(e.event, "workflow", "{}", e.data);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_parent_cancels_its_children_and_theirs_unless_they_run_anyway() {
    let sys = TestSystem::start_with(Options { testing: true, ..Default::default() }).await;
    let mut conn = sys.connect().await;
    // A parent that fails every attempt (dead-lettered after 3).
    let parent = conn.submit(&json!({"kind": "test.fail", "payload": {"times": 10}}), None).await.unwrap();
    assert_eq!(parent.status, 202, "{}", parent.text());
    let parent = parent.json()["id"].as_str().unwrap().to_owned();
    let child = |after: &str, run: bool| {
        let mut body = json!({"kind": "test.sleep", "payload": {"ms": 1}, "after": [after]});
        if run {
            body["on_parent_failure"] = json!("run");
        }
        body
    };
    let mut id_of = async |body: Value| {
        let r = conn.submit(&body, None).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_owned()
    };
    let cancelled = id_of(child(&parent, false)).await;
    let grandchild = id_of(child(&cancelled, false)).await;
    let anyway = id_of(child(&parent, true)).await;
    let s = wait_final(&mut conn, &cancelled, Duration::from_secs(30)).await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("cancelled"), Some("parent-failed")),
        "{s}"
    );
    let s = wait_final(&mut conn, &grandchild, Duration::from_secs(10)).await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("cancelled"), Some("parent-failed")),
        "{s}"
    );
    let s = wait_final(&mut conn, &anyway, Duration::from_secs(10)).await;
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["result"]["parents"][0]["status"], "dead_lettered", "{s}");
    assert_eq!(wait_final(&mut conn, &parent, Duration::from_secs(1)).await["status"], "dead_lettered");
    // A waiting job its client cancels ends cancelled at once, without waiting for its parent.
    let slow = conn.submit(&json!({"kind": "test.sleep", "payload": {"ms": 20_000}}), None).await.unwrap();
    let slow = slow.json()["id"].as_str().unwrap().to_owned();
    let r = conn.submit(&child(&slow, false), None).await.unwrap();
    let waiting = r.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.status(&waiting).await.unwrap().json()["status"] != "waiting_for_parents" {
        assert!(Instant::now() < deadline, "never waited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r =
        conn.request(hyper::Method::DELETE, &format!("/v1/jobs/{waiting}"), &[], Vec::new()).await.unwrap();
    assert_eq!(r.json()["status"], "cancelled", "{}", r.text());
    let s = wait_final(&mut conn, &waiting, Duration::from_secs(5)).await;
    assert_eq!((s["status"].as_str(), s["reason"].as_str()), (Some("cancelled"), None), "{s}");
    conn.request(hyper::Method::DELETE, &format!("/v1/jobs/{slow}"), &[], Vec::new()).await.unwrap();

    // Tenancy: another client may not wait for this client's job, nor read its workflow.
    let mut other = sys.client_as(OTHER_CLIENT).connect().await.unwrap();
    let r = other.submit(&child(&anyway, false), None).await.unwrap();
    assert_problem(&r, 404, "not-found");
    let r = conn.submit_workflow(&[step("only", &[], 1)]).await.unwrap();
    let workflow = r.json()["id"].as_str().unwrap().to_owned();
    wait_complete(&mut conn, Group::Workflow, &workflow, Duration::from_secs(10)).await;
    assert_problem(&other.workflow(&workflow).await.unwrap(), 404, "not-found");
    let listed = other
        .request(hyper::Method::GET, &format!("/v1/jobs?workflow={workflow}"), &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(listed.json()["jobs"], json!([]), "{}", listed.text());
    assert!(matches!(other.workflow_events(&workflow, None).await.unwrap(), Err(r) if r.status == 404));
    // A workflow is no batch, nor a batch a workflow.
    assert_problem(&conn.batch(&workflow).await.unwrap(), 404, "not-found");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workflow_is_refused_whole_naming_each_step() {
    let sys = TestSystem::start_with(Options { testing: true, ..Default::default() }).await;
    let mut conn = sys.connect().await;
    let refused = |r: &gatehouse_client::Response| -> Vec<String> {
        let problem = assert_problem(r, 422, "workflow-refused");
        problem["errors"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap().to_owned()).collect()
    };
    let cycle = [step("a", &["c"], 1), step("b", &["a"], 1), step("c", &["b"], 1), step("d", &[], 1)];
    let paths = refused(&conn.submit_workflow(&cycle).await.unwrap());
    assert!(paths.len() == 1 && paths[0].starts_with("/steps/") && paths[0].ends_with("/after"), "{paths:?}");
    let unknown =
        [step("a", &["nope"], 1), step("a", &[], 1), json!({"name": "b", "kind": "nope", "payload": {}})];
    assert_eq!(refused(&conn.submit_workflow(&unknown).await.unwrap()), ["/steps/1/name", "/steps/2/kind"]);
    let unknown = [step("a", &["nope"], 1)];
    assert_eq!(refused(&conn.submit_workflow(&unknown).await.unwrap()), ["/steps/0/after"]);
    // A sequenced kind's order is its sequence's.
    let sequenced = [
        step("a", &[], 1),
        json!({"name": "b", "after": ["a"], "kind": "ledger.apply", "payload": {"account": "w-1", "amount": 1},
            "sequence": {"key": "w-1", "number": 1}}),
    ];
    assert_eq!(refused(&conn.submit_workflow(&sequenced).await.unwrap()), ["/steps/1/after"]);
    assert_problem(&conn.submit_workflow(&[]).await.unwrap(), 422, "workflow-size");
    let too_many: Vec<Value> = (0..101).map(|i| step(&format!("s{i}"), &[], 1)).collect();
    assert_problem(&conn.submit_workflow(&too_many).await.unwrap(), 422, "workflow-size");
    // Nothing of a refused workflow ran: the account's first number is still free.
    let r = conn
        .submit(
            &json!({"kind": "ledger.apply", "payload": {"account": "w-1", "amount": 7},
                "sequence": {"key": "w-1", "number": 1}}),
            Some(10),
        )
        .await
        .unwrap();
    assert_eq!(r.json()["result"]["balance"], 7, "{}", r.text());
    sys.stop().await;
}

/// Three workers on PostgreSQL, one killed (-9) and restarted again and again while workflows
/// run: every step is decided once (one vault record per `vault.put` step), none before its
/// parents, nothing lost — a fan-in step whose parents are decided on different workers at the
/// same moment runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workflows_lose_nothing_and_keep_their_order_under_kill_9_on_postgres() {
    let sys = gatehouse_e2e::three_workers(true, env!("CARGO_BIN_EXE_e2e-worker")).await;
    let mut conn = sys.connect().await;
    let put = |name: &str, after: &[&str]| json!({"name": name, "after": after, "kind": "vault.put", "payload": {"record": {"step": name}}});
    let workflow = vec![
        put("extract", &[]),
        put("a", &["extract"]),
        put("b", &["extract"]),
        put("c", &["extract"]),
        step("merge", &["a", "b", "c"], 20),
    ];
    let vault_before = oracle::count(&sys.storage(), "vault");
    let workers = sys.worker_processes().to_vec();
    let killer = tokio::spawn(async move {
        for round in 0..6u64 {
            tokio::time::sleep(Duration::from_millis(150 + 70 * round)).await;
            let victim = &workers[(round % 3) as usize];
            victim.kill();
            victim.start();
        }
    });
    let mut workflows = Vec::new();
    for _ in 0..12 {
        let r = conn.submit_workflow(&workflow).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.text());
        workflows.push(r.json());
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    killer.await.unwrap();
    let decided = oracle::decided_at(&sys.storage());
    let mut decided = decided;
    for accepted in &workflows {
        let id = accepted["id"].as_str().unwrap();
        let summary = wait_complete(&mut conn, Group::Workflow, id, Duration::from_secs(120)).await;
        assert_eq!(summary["counts"], json!({"succeeded": 5}), "{summary}");
        decided = oracle::decided_at(&sys.storage());
        let step_id = |name: &str| accepted["steps"][name].as_str().unwrap().to_owned();
        for child in ["a", "b", "c", "merge"] {
            let parents: &[&str] = if child == "merge" { &["a", "b", "c"] } else { &["extract"] };
            for parent in parents {
                assert!(
                    decided[&step_id(child)] >= decided[&step_id(parent)],
                    "{child} decided before {parent}"
                );
            }
        }
        let merge = wait_final(&mut conn, &step_id("merge"), Duration::from_secs(5)).await;
        let started = merge["result"]["started_at_ms"].as_u64().unwrap();
        for parent in ["a", "b", "c"] {
            assert!(
                started >= decided[&step_id(parent)],
                "merge started before {parent} was decided: {merge}"
            );
        }
        let given: Vec<&str> = merge["result"]["parents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["status"].as_str().unwrap())
            .collect();
        assert_eq!(given, ["succeeded"; 3], "{merge}");
    }
    // Each vault.put step applied once: 4 records per workflow, no more.
    assert_eq!(oracle::count(&sys.storage(), "vault") - vault_before, 4 * 12);
    assert!(decided.len() >= 5 * 12);
    sys.stop().await;
}

/// Three workers on PostgreSQL releasing wide fan-outs at once: every sweep skips the rows
/// another holds, so none deadlocks (two sweeps releasing one fan-out's children in different
/// orders did: `deadlock detected` in the log, the pass lost), and every workflow completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wide_fan_outs_release_without_deadlocks_across_three_workers_on_postgres() {
    let sys = gatehouse_e2e::three_workers(true, env!("CARGO_BIN_EXE_e2e-worker")).await;
    let mut conn = sys.connect().await;
    let put = |name: String, after: Vec<String>| json!({"name": name, "after": after, "kind": "vault.put", "payload": {"record": {}}});
    let middle: Vec<String> = (0..98).map(|i| format!("m{i}")).collect();
    let mut steps = vec![put("root".into(), vec![])];
    steps.extend(middle.iter().map(|m| put(m.clone(), vec!["root".into()])));
    steps.push(put("merge".into(), middle.clone()));
    let mut ids = Vec::new();
    // (Before the fix, one run in three of this saw a deadlock.)
    for _ in 0..12 {
        let r = conn.submit_workflow(&steps).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        let summary = wait_complete(&mut conn, Group::Workflow, id, Duration::from_secs(60)).await;
        assert_eq!(summary["counts"], json!({"succeeded": 100}), "{summary}");
    }
    for worker in sys.worker_processes() {
        let log = worker.log();
        assert!(!log.contains("deadlock detected"), "a sweep deadlocked:\n{log}");
    }
    sys.stop().await;
}
