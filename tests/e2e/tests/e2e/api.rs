//! The foundation, end to end through real mTLS, a real RabbitMQ and a real SQLite file.

use std::time::Duration;

use gatehouse_e2e::{OTHER_CLIENT, TestSystem, assert_problem, wait_final};
use serde_json::json;

#[tokio::test]
async fn vault_put_then_get_returns_the_record() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let record = json!({"name": "Ada Lovelace", "iban": "GB33BUKB20201555555555"});

    let put =
        conn.submit(&json!({"kind": "vault.put", "payload": {"record": record}}), Some(10)).await.unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    let token = put.json()["result"]["token"].as_str().expect("token").to_owned();
    assert!(token.starts_with("tok_"));

    let get =
        conn.submit(&json!({"kind": "vault.get", "payload": {"token": token}}), Some(10)).await.unwrap();
    assert_eq!(get.status, 200, "{}", get.text());
    assert_eq!(get.json()["status"], "succeeded");
    assert_eq!(get.json()["result"]["record"], record);
    sys.stop().await;
}

#[tokio::test]
async fn ledger_numbers_sent_2_1_3_apply_in_order() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let amounts = [(2, 20), (1, 1), (3, 300)];
    let mut ids = Vec::new();
    for (number, amount) in amounts {
        let job = json!({
            "kind": "ledger.apply",
            "payload": {"account": "acct-42", "amount": amount},
            "sequence": {"key": "acct-42", "number": number},
        });
        let res = conn.submit(&job, None).await.unwrap();
        assert_eq!(res.status, 202, "{}", res.text());
        ids.push((number, res.json()["id"].as_str().unwrap().to_owned()));
    }
    // Balance after each number proves the order: 1, then 1+20, then 1+20+300.
    let expected = [(1, 1), (2, 21), (3, 321)];
    for (number, id) in &ids {
        let status = wait_final(&mut conn, id, Duration::from_secs(10)).await;
        assert_eq!(status["status"], "succeeded", "{status}");
        let (_, balance) = expected.iter().find(|(n, _)| n == number).unwrap();
        assert_eq!(status["result"]["sequence"], *number, "{status}");
        assert_eq!(status["result"]["balance"], *balance, "{status}");
    }
    let balance = conn
        .submit(&json!({"kind": "ledger.balance", "payload": {"account": "acct-42"}}), Some(10))
        .await
        .unwrap();
    assert_eq!(balance.json()["result"], json!({"account": "acct-42", "balance": 321, "sequence": 3}));
    sys.stop().await;
}

#[tokio::test]
async fn a_gap_shows_waiting_for_sequence_with_the_expected_number() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let job = |n: u64| json!({"kind": "ledger.apply", "payload": {"account": "gap", "amount": 1}, "sequence": {"key": "gap", "number": n}});
    let res = conn.submit(&job(2), Some(1)).await.unwrap();
    assert_eq!(res.status, 202, "{}", res.text());
    let body = res.json();
    assert_eq!(body["status"], "waiting_for_sequence", "{body}");
    assert_eq!(body["expected"], 1);
    let id = body["id"].as_str().unwrap().to_owned();
    let status = conn.status(&id).await.unwrap().json();
    assert_eq!(
        (status["status"].clone(), status["expected"].clone()),
        (json!("waiting_for_sequence"), json!(1))
    );

    assert_eq!(conn.submit(&job(1), Some(10)).await.unwrap().status, 200);
    let status = wait_final(&mut conn, &id, Duration::from_secs(10)).await;
    assert_eq!(status["result"]["balance"], 2, "{status}");
    sys.stop().await;
}

#[tokio::test]
async fn async_submit_answers_202_then_status_reaches_succeeded() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let res =
        conn.submit(&json!({"kind": "vault.put", "payload": {"record": {"k": "v"}}}), None).await.unwrap();
    assert_eq!(res.status, 202, "{}", res.text());
    let body = res.json();
    assert_eq!(body["status"], "queued");
    let id = body["id"].as_str().unwrap();
    assert_eq!(body["status_url"], format!("/v1/jobs/{id}"));

    let status = wait_final(&mut conn, id, Duration::from_secs(10)).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert!(status["result"]["token"].as_str().unwrap().starts_with("tok_"));
    sys.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_is_the_same_job_applied_once() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let job = json!({"kind": "vault.put", "payload": {"record": {"n": 1}}, "idempotency_key": "order-9913"});
    let first = conn.submit(&job, Some(10)).await.unwrap().json();
    let second = conn.submit(&job, Some(10)).await.unwrap().json();
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["status"], "succeeded");
    // The second submit was answered from the stored outcome: the same token, not a new record.
    assert_eq!(first["result"]["token"], second["result"]["token"]);
    let rows = gatehouse_e2e::oracle::count(&sys.database(), "vault");
    assert_eq!(rows, 1);
    sys.stop().await;
}

#[tokio::test]
async fn schema_violation_is_422_problem_json_naming_the_field() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let job = json!({
        "kind": "ledger.apply",
        "payload": {"account": "acct-1", "amount": "a lot"},
        "sequence": {"key": "acct-1", "number": 1},
    });
    let res = conn.submit(&job, None).await.unwrap();
    let body = assert_problem(&res, 422, "schema-violation");
    assert_eq!(body["errors"][0]["path"], "/payload/amount", "{body}");
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("integer"), "{body}");
    sys.stop().await;
}

#[tokio::test]
async fn another_clients_job_id_is_404() {
    let sys = TestSystem::start().await;
    let mut mine = sys.connect().await;
    let res = mine
        .submit(&json!({"kind": "vault.put", "payload": {"record": {"s": "x"}}}), Some(10))
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", res.text());
    let id = res.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(mine.status(&id).await.unwrap().status, 200);

    let mut theirs = sys.client_as(OTHER_CLIENT).connect().await.unwrap();
    assert_problem(&theirs.status(&id).await.unwrap(), 404, "not-found");
    assert_problem(&theirs.status("not-an-id").await.unwrap(), 404, "not-found");
    sys.stop().await;
}

#[tokio::test]
async fn envelope_fields_set_by_the_gatekeeper_are_refused() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let res = conn
        .submit(
            &json!({"kind": "vault.put", "payload": {"record": {}}, "reply_to": "amq.rabbitmq.reply-to"}),
            None,
        )
        .await
        .unwrap();
    let body = assert_problem(&res, 400, "invalid-envelope");
    assert!(body["detail"].as_str().unwrap().contains("reply_to"), "{body}");
    sys.stop().await;
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes_and_their_statuses() {
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let res = conn.request(gatehouse_client::Method::GET, "/openapi.json", &[], Vec::new()).await.unwrap();
    assert_eq!(res.status, 200);
    let doc = res.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        [
            "/healthz",
            "/openapi.json",
            "/readyz",
            "/v1/batches",
            "/v1/batches/{id}",
            "/v1/jobs",
            "/v1/jobs/{id}",
            "/v1/jobs/{id}/events",
            "/v1/keys",
            "/v1/workflows",
            "/v1/workflows/{id}",
            "/v1/workflows/{id}/events"
        ]
    );
    let documented = |path: &str, method: &str, status: u16| {
        doc["paths"][path][method]["responses"].get(status.to_string()).is_some()
    };

    // Every status the submit route gives (the bad-input corpus covers the rest) is documented.
    for s in [200, 202, 400, 403, 404, 413, 415, 422, 429, 503] {
        assert!(documented("/v1/jobs", "post", s), "POST /v1/jobs {s} is not documented");
    }
    let good = json!({"kind": "vault.put", "payload": {"record": {"a": "b"}}});
    let json_ct = [("content-type", "application/json")];
    let seen = [
        ("/v1/jobs", "post", conn.submit(&good, Some(10)).await.unwrap()),
        ("/v1/jobs", "post", conn.submit(&good, None).await.unwrap()),
        (
            "/v1/jobs",
            "post",
            conn.request(gatehouse_client::Method::POST, "/v1/jobs", &json_ct, b"{".to_vec()).await.unwrap(),
        ),
        ("/v1/jobs", "post", conn.submit(&json!({"kind": "nope", "payload": {}}), None).await.unwrap()),
        (
            "/v1/jobs",
            "post",
            conn.request(gatehouse_client::Method::POST, "/v1/jobs", &[], b"{}".to_vec()).await.unwrap(),
        ),
        ("/v1/jobs/{id}", "get", conn.status(&"0".repeat(32)).await.unwrap()),
        (
            "/v1/keys",
            "get",
            conn.request(gatehouse_client::Method::GET, "/v1/keys", &[], Vec::new()).await.unwrap(),
        ),
        (
            "/healthz",
            "get",
            conn.request(gatehouse_client::Method::GET, "/healthz", &[], Vec::new()).await.unwrap(),
        ),
        (
            "/readyz",
            "get",
            conn.request(gatehouse_client::Method::GET, "/readyz", &[], Vec::new()).await.unwrap(),
        ),
    ];
    let id = seen[1].2.json()["id"].as_str().unwrap().to_owned();
    let status = conn.status(&id).await.unwrap();
    let not_theirs = conn.events(&"0".repeat(32), None).await.unwrap().err().expect("a stream");
    let streamed = match sys.connect().await.events(&id, None).await.unwrap() {
        Ok(mut stream) => {
            assert_eq!(stream.next().await.unwrap().map(|e| e.event).as_deref(), Some("state"));
            200
        }
        Err(res) => res.status,
    };
    assert!(documented("/v1/jobs/{id}/events", "get", streamed), "events answered {streamed}");
    let events = "/v1/jobs/{id}/events";
    for (path, method, res) in
        seen.iter().chain([&("/v1/jobs/{id}", "get", status), &(events, "get", not_theirs)])
    {
        assert!(
            documented(path, method, res.status),
            "{method} {path} answered {}, not documented",
            res.status
        );
    }
    sys.stop().await;
}

#[tokio::test]
async fn excess_connections_are_refused_while_the_admin_healthz_answers() {
    let sys =
        TestSystem::start_with(gatehouse_e2e::Options { max_connections: Some(4), ..Default::default() })
            .await;
    // wait_ready used one connection and closed it; let the server notice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut c = sys.connect().await;
        assert_eq!(
            c.request(gatehouse_client::Method::GET, "/healthz", &[], Vec::new()).await.unwrap().status,
            200
        );
        open.push(c);
    }
    let fifth = async {
        let mut c = sys.client().connect().await?;
        c.request(gatehouse_client::Method::GET, "/healthz", &[], Vec::new()).await
    };
    assert!(fifth.await.is_err(), "a fifth connection was served past the limit of 4");
    let (status, _) = gatehouse_e2e::management::call_at(sys.admin_addr, "GET", "/healthz", None).await;
    assert_eq!(status, 200, "the admin listener does not answer while the public one is full");
    drop(open);
    sys.stop().await;
}

#[tokio::test]
async fn a_policy_reload_takes_effect_on_open_connections_and_is_counted() {
    let sys = TestSystem::start().await;
    let mut theirs = sys.client_as(OTHER_CLIENT).connect().await.unwrap();
    let job = json!({"kind": "vault.put", "payload": {"record": {"r": 1}}});
    assert_eq!(theirs.submit(&job, None).await.unwrap().status, 202);

    // Take the other client out of the policy and reload (what SIGHUP does).
    let policy = std::fs::read_to_string(sys.policy_file()).unwrap();
    let without: String = policy
        .split("[[client]]")
        .filter(|c| !c.contains(OTHER_CLIENT))
        .collect::<Vec<_>>()
        .join("[[client]]");
    std::fs::write(sys.policy_file(), without).unwrap();
    assert!(sys.policy.reload());
    // The same connection, still open, now gets the new policy.
    assert_problem(&theirs.submit(&job, None).await.unwrap(), 403, "unknown-client");
    // A broken file is not loaded: the policy in force stays.
    std::fs::write(sys.policy_file(), "[[client]\nbroken").unwrap();
    assert!(!sys.policy.reload());
    assert_eq!(sys.connect().await.submit(&job, None).await.unwrap().status, 202);

    let (status, metrics) = gatehouse_e2e::management::call_at(sys.admin_addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("gatehouse_jobs_accepted_total 2"), "{metrics}");
    assert!(metrics.contains("gatehouse_requests_rejected_total{reason=\"unknown-client\"} 1"), "{metrics}");
    assert!(metrics.contains("gatehouse_broker_connected 1"), "{metrics}");
    // Request durations by route pattern and status.
    assert!(
        metrics.lines().any(|l| l
            .starts_with(r#"gatehouse_request_duration_seconds_count{route="/v1/jobs",status="202"}"#)
            || l.starts_with(r#"gatehouse_request_duration_seconds_count{route="/v1/jobs",status="200"}"#)),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"gatehouse_request_duration_seconds_count{route="/v1/jobs",status="403"} 1"#),
        "{metrics}"
    );
    sys.stop().await;
}

/// The catalog's `testing` kinds exist at the gatekeeper only when testing is on: in
/// production they are unknown kinds (the worker would dead-letter them) and absent from the
/// API document.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_kinds_are_unknown_to_a_gatekeeper_without_testing() {
    for testing in [false, true] {
        let sys =
            gatehouse_e2e::TestSystem::start_with(gatehouse_e2e::Options { testing, ..Default::default() })
                .await;
        let mut conn = sys.connect().await;
        let r = conn
            .submit(&serde_json::json!({"kind": "test.sleep", "payload": {"ms": 1}}), Some(5))
            .await
            .unwrap();
        let doc = conn
            .request(gatehouse_client::Method::GET, "/openapi.json", &[], Vec::new())
            .await
            .unwrap()
            .json();
        let listed = doc["components"]["schemas"]["SubmitRequest"]["properties"]["kind"]["enum"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("test.sleep"));
        if testing {
            assert_eq!(r.json()["status"], "succeeded", "{}", r.text());
            assert!(listed);
        } else {
            gatehouse_e2e::assert_problem(&r, 422, "unknown-kind");
            assert!(!listed, "a test kind in the production API document");
        }
        sys.stop().await;
    }
}
