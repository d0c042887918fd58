//! The bad-input corpus: requests a careless or hostile client sends. Each gets the status
//! and problem type a user can act on, and none of them publishes anything (checked against
//! the queues, with the worker stopped so that nothing is consumed meanwhile).

use gatehouse_client::Method;
use gatehouse_e2e::{Options, TestSystem, assert_problem};
use serde_json::{Value, json};

/// One request of the corpus.
struct Case {
    name: String,
    client: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    problem: &'static str,
}

fn case(name: &str, body: impl Into<Vec<u8>>, status: u16, problem: &'static str) -> Case {
    Case {
        name: name.to_owned(),
        client: "client",
        content_type: Some("application/json"),
        body: body.into(),
        status,
        problem,
    }
}

fn job(v: Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn vault_put(record: Value) -> Vec<u8> {
    job(json!({"kind": "vault.put", "payload": {"record": record}}))
}

fn ledger(payload: Value, sequence: Value) -> Vec<u8> {
    job(json!({"kind": "ledger.apply", "payload": payload, "sequence": sequence}))
}

fn corpus() -> Vec<Case> {
    let ok_record = json!({"name": "Ada"});
    let mut cases = vec![
        // Not JSON at all, or broken JSON.
        case("empty body", "", 400, "malformed-json"),
        case("truncated object", r#"{"kind":"vault.put","payl"#, 400, "malformed-json"),
        case("truncated array", "[", 400, "malformed-json"),
        case("single quotes", "{'kind':'vault.put'}", 400, "malformed-json"),
        case("trailing garbage", r#"{"kind":"vault.put","payload":{"record":{}}} x"#, 400, "malformed-json"),
        case("NaN literal", r#"{"kind":"vault.put","payload":{"record":{"n":NaN}}}"#, 400, "malformed-json"),
        case("trailing comma", r#"{"kind":"vault.put","payload":{"record":{}},}"#, 400, "malformed-json"),
        case(
            "invalid UTF-8",
            b"{\"kind\":\"vault.put\",\"payload\":{\"record\":{\"n\":\"\xff\xfe\"}}}".to_vec(),
            400,
            "malformed-json",
        ),
        case(
            "lone surrogate escape",
            r#"{"kind":"vault.put","payload":{"record":{"n":"\ud800"}}}"#,
            400,
            "malformed-json",
        ),
        case(
            "duplicate top-level key",
            r#"{"kind":"vault.put","kind":"vault.get","payload":{"record":{}}}"#,
            400,
            "malformed-json",
        ),
        case(
            "duplicate payload key",
            r#"{"kind":"vault.put","payload":{"record":{"a":1,"a":2}}}"#,
            400,
            "malformed-json",
        ),
        case(
            "nesting past the parser's limit",
            format!("{}{}", "[".repeat(200), "]".repeat(200)),
            400,
            "malformed-json",
        ),
        // Valid JSON, not the envelope.
        case("null body", "null", 400, "invalid-envelope"),
        case("array body", "[]", 400, "invalid-envelope"),
        case("string body", "\"vault.put\"", 400, "invalid-envelope"),
        case("missing kind", job(json!({"payload": {"record": {}}})), 400, "invalid-envelope"),
        case("missing payload", job(json!({"kind": "vault.put"})), 400, "invalid-envelope"),
        case("kind is a number", job(json!({"kind": 7, "payload": {}})), 400, "invalid-envelope"),
        case(
            "priority is a string",
            job(json!({"kind": "vault.put", "payload": {"record": {}}, "priority": "high"})),
            400,
            "invalid-envelope",
        ),
        case(
            "priority negative",
            job(json!({"kind": "vault.put", "payload": {"record": {}}, "priority": -1})),
            422,
            "invalid-priority",
        ),
        case(
            "priority huge",
            job(json!({"kind": "vault.put", "payload": {"record": {}}, "priority": 300})),
            422,
            "invalid-priority",
        ),
        case(
            "sequence is a string",
            job(json!({"kind": "ledger.apply", "payload": {"account": "a", "amount": 1}, "sequence": "a:1"})),
            400,
            "invalid-envelope",
        ),
        case(
            "sequence with an extra field",
            ledger(json!({"account": "a", "amount": 1}), json!({"key": "a", "number": 1, "after": 0})),
            400,
            "invalid-envelope",
        ),
        case(
            "sequence number negative",
            ledger(json!({"account": "a", "amount": 1}), json!({"key": "a", "number": -1})),
            400,
            "invalid-envelope",
        ),
        case(
            "idempotency key is a number",
            job(json!({"kind": "vault.put", "payload": {"record": {}}, "idempotency_key": 5})),
            400,
            "invalid-envelope",
        ),
    ];
    // Broker properties are the gatekeeper's alone (mass assignment).
    for field in [
        "reply_to",
        "correlation_id",
        "user",
        "user_id",
        "client",
        "id",
        "message_id",
        "submitted_at_ms",
        "headers",
    ] {
        let mut v = json!({"kind": "vault.put", "payload": {"record": {}}});
        v[field] = json!("mine");
        cases.push(case(&format!("envelope field {field}"), job(v), 400, "invalid-envelope"));
    }
    cases.extend([
        // Kinds.
        case("unknown kind", job(json!({"kind": "nope", "payload": {}})), 422, "unknown-kind"),
        case("empty kind", job(json!({"kind": "", "payload": {}})), 422, "unknown-kind"),
        case("kind in other case", job(json!({"kind": "VAULT.PUT", "payload": {"record": {}}})), 422, "unknown-kind"),
        case("priority above 9", job(json!({"kind": "vault.put", "payload": {"record": {}}, "priority": 10})), 422, "invalid-priority"),
        case("priority not whole", job(json!({"kind": "vault.put", "payload": {"record": {}}, "priority": 6.5})), 400, "invalid-envelope"),
        // Sequences.
        case("sequenced kind without sequence", job(json!({"kind": "ledger.apply", "payload": {"account": "a", "amount": 1}})), 422, "invalid-sequence"),
        case("sequence on an unsequenced kind", job(json!({"kind": "vault.put", "payload": {"record": {}}, "sequence": {"key": "k", "number": 1}})), 422, "invalid-sequence"),
        case("sequence key is not the account", ledger(json!({"account": "a", "amount": 1}), json!({"key": "b", "number": 1})), 422, "invalid-sequence"),
        case("sequence number 0", ledger(json!({"account": "a", "amount": 1}), json!({"key": "a", "number": 0})), 422, "invalid-sequence"),
        case("sequence key with a space", ledger(json!({"account": "a b", "amount": 1}), json!({"key": "a b", "number": 1})), 422, "invalid-sequence"),
        case("sequence key too long", ledger(json!({"account": "a".repeat(200), "amount": 1}), json!({"key": "a".repeat(200), "number": 1})), 422, "invalid-sequence"),
        // Out of bounds whatever the kind.
        case("NUL in a value", vault_put(json!({"n": "a\u{0}b"})), 422, "payload-out-of-bounds"),
        case("escape character in a value", vault_put(json!({"n": "\u{1b}[31mred"})), 422, "payload-out-of-bounds"),
        case("control character in a key", vault_put(json!({"n\u{7}": "x"})), 422, "payload-out-of-bounds"),
        case("C1 control character", vault_put(json!({"n": "a\u{85}b"})), 422, "payload-out-of-bounds"),
        case("huge number", br#"{"kind":"vault.put","payload":{"record":{"n":1e300}}}"#.to_vec(), 422, "payload-out-of-bounds"),
        case("nesting deeper than 32", vault_put((0..40).fold(json!(1), |v, _| json!([v]))), 422, "payload-out-of-bounds"),
        // The kind's schema.
        case("vault.put without record", job(json!({"kind": "vault.put", "payload": {}})), 422, "schema-violation"),
        case("record is a string", vault_put(json!("Ada")), 422, "schema-violation"),
        case("record holds an object", vault_put(json!({"nested": {"a": 1}})), 422, "schema-violation"),
        case("record value too long", vault_put(json!({"n": "x".repeat(5000)})), 422, "schema-violation"),
        case("record with too many fields", vault_put(Value::Object((0..70).map(|i| (format!("f{i}"), json!(i))).collect())), 422, "schema-violation"),
        case("extra payload field", job(json!({"kind": "vault.put", "payload": {"record": {}, "owner": "mallory"}})), 422, "schema-violation"),
        case("amount is a string", ledger(json!({"account": "a", "amount": "5"}), json!({"key": "a", "number": 1})), 422, "schema-violation"),
        case("amount is fractional", ledger(json!({"account": "a", "amount": 1.5}), json!({"key": "a", "number": 1})), 422, "schema-violation"),
        case("amount too large", ledger(json!({"account": "a", "amount": 1_000_000_000_000_000_i64}), json!({"key": "a", "number": 1})), 422, "schema-violation"),
        case("account with a slash", ledger(json!({"account": "a/b", "amount": 1}), json!({"key": "a/b", "number": 1})), 422, "schema-violation"),
        case("ledger.balance without account", job(json!({"kind": "ledger.balance", "payload": {}})), 422, "schema-violation"),
        case("vault.get with a bad token", job(json!({"kind": "vault.get", "payload": {"token": "../../etc/passwd"}})), 422, "schema-violation"),
        case("vault.delete with an extra field", job(json!({"kind": "vault.delete", "payload": {"token": format!("tok_{}", "0".repeat(32)), "all": true}})), 422, "schema-violation"),
        case("idempotency key empty", job(json!({"kind": "vault.put", "payload": {"record": ok_record}, "idempotency_key": ""})), 422, "invalid-idempotency-key"),
        case("idempotency key too long", job(json!({"kind": "vault.put", "payload": {"record": {}}, "idempotency_key": "k".repeat(300)})), 422, "invalid-idempotency-key"),
        // Size.
        case("body over the limit", vault_put(json!({"n": "x".repeat(70_000)})), 413, "body-too-large"),
    ]);
    // Content types.
    for (name, ct) in [
        ("text/plain", Some("text/plain")),
        ("no content type", None),
        ("XML", Some("application/xml")),
        ("JSON patch", Some("application/json-patch+json")),
        ("form", Some("application/x-www-form-urlencoded")),
    ] {
        cases.push(Case {
            content_type: ct,
            ..case(&format!("content type {name}"), vault_put(json!({})), 415, "unsupported-media-type")
        });
    }
    // Policy.
    cases.extend([
        Case {
            client: "limited",
            ..case(
                "kind not allowed",
                ledger(json!({"account": "acct-1", "amount": 1}), json!({"key": "acct-1", "number": 1})),
                403,
                "kind-not-allowed",
            )
        },
        Case {
            client: "limited",
            ..case(
                "priority above the ceiling",
                job(json!({"kind": "vault.put", "payload": {"record": {}}, "priority": 7})),
                403,
                "priority-above-ceiling",
            )
        },
        Case { client: "stranger", ..case("unknown client", vault_put(json!({})), 403, "unknown-client") },
        Case {
            client: "keyed",
            ..case(
                "foreign sequence key",
                ledger(json!({"account": "other-1", "amount": 1}), json!({"key": "other-1", "number": 1})),
                403,
                "sequence-key-not-allowed",
            )
        },
        Case {
            client: "throttled",
            ..case("first of a burst of 1", vault_put(json!({})), 403, "kind-not-allowed")
        },
        Case { client: "throttled", ..case("rate exceeded", vault_put(json!({})), 429, "rate-limited") },
    ]);
    cases
}

const POLICY: &str = r#"
[[client]]
identity = "limited"
kinds = ["vault.*"]
max_priority = 3

[[client]]
identity = "keyed"
kinds = ["ledger.*"]
max_priority = 9
sequence_key_prefixes = ["acct-"]

[[client]]
identity = "throttled"
kinds = []
max_priority = 9
rate_per_s = 0.01
burst = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_request_gets_its_problem_and_publishes_nothing() {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        extra_clients: &["limited", "keyed", "throttled", "stranger"],
        extra_policy: POLICY,
        ..Options::default()
    })
    .await;
    sys.worker_process().kill();
    let cases = corpus();
    assert!(cases.len() >= 60, "only {} cases", cases.len());

    let mut failures = Vec::new();
    for c in &cases {
        let mut conn = sys.client_as(c.client).connect().await.unwrap();
        let headers: Vec<(&str, &str)> = c.content_type.iter().map(|ct| ("content-type", *ct)).collect();
        let res = conn.request(Method::POST, "/v1/jobs", &headers, c.body.clone()).await.unwrap();
        let problem = res.json()["type"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("urn:gatehouse:problem:")
            .to_owned();
        if res.status != c.status
            || problem != c.problem
            || res.content_type.as_deref() != Some("application/problem+json")
        {
            failures
                .push(format!("{}: got {} {problem}, want {} {}", c.name, res.status, c.status, c.problem));
        }
    }
    // A chunked body over the limit, without a length: refused before it is read whole. The
    // server answers 413 and closes while the client may still be sending, so the client does
    // not always get to read the answer; it must never be a success.
    let mut answered_413 = false;
    for _ in 0..5 {
        let mut conn = sys.connect().await;
        let headers = [("content-type", "application/json")];
        match conn
            .request_streamed(
                Method::POST,
                "/v1/jobs",
                &headers,
                vec![b' '; 16 * 1024],
                8,
                std::time::Duration::ZERO,
            )
            .await
        {
            Ok(res) => {
                assert_problem(&res, 413, "body-too-large");
                answered_413 = true;
                break;
            }
            Err(_) => continue,
        }
    }
    assert!(answered_413, "no 413 for a chunked body over the limit in 5 tries");

    let t = sys.topology();
    let published =
        sys.queue_depth(&t.job_queue("interactive")).await + sys.queue_depth(&t.job_queue("batch")).await;
    println!(
        "bad-input corpus: {} cases + chunked oversize; wrong answers {}; published {published}",
        cases.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(published, 0, "a refused request was published");
    // Control: a good request is published, and the count above would have seen it.
    let mut conn = sys.connect().await;
    let ok =
        conn.submit(&json!({"kind": "vault.put", "payload": {"record": {"n": "ok"}}}), None).await.unwrap();
    assert_eq!(ok.status, 202);
    assert_eq!(sys.queue_depth(&t.job_queue("interactive")).await, 1);
    sys.stop().await;
}
