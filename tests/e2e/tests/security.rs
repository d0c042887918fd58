//! Isolation claims, each a test that could fail: least-privilege broker users, nothing runs
//! that the gatekeeper did not sign, and sensitive data appears in no queue, dead letter,
//! database file or log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse_broker::lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use gatehouse_broker::lapin::types::FieldTable;
use gatehouse_broker::lapin::{BasicProperties, Connection};
use gatehouse_devenv::broker_node::amqp_addr;
use gatehouse_e2e::{
    Options, TestSystem, assert_problem, broker_ctl, broker_url, dead_letters, management, oracle, repo_root,
    wait_final,
};
use gatehouse_protocol::{crypto, hex, keys};
use serde_json::{Value, json};

/// Everything every in-process component logs, at every level, for this test binary (all
/// tests of this binary share it; each looks only for its own secrets).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    gatehouse_e2e::captured_logs("trace")
}

fn url_as(user: &str, password: &str, vhost: &str) -> String {
    let addr = amqp_addr(&broker_url()).expect("broker address");
    format!("amqp://{user}:{password}@{addr}/{vhost}")
}

/// Runs `op` on a fresh channel of `conn` and returns its error text (a refused operation
/// closes the channel).
async fn refusal<F, Fut, T>(conn: &Connection, op: F) -> String
where
    F: FnOnce(gatehouse_broker::lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, gatehouse_broker::lapin::Error>>,
{
    let ch = conn.create_channel().await.expect("channel");
    match op(ch).await {
        Ok(_) => "allowed".into(),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_privilege_users_do_their_job_and_nothing_else() {
    captured_logs();
    // The shipped definitions, in a vhost of this test's own (a running dev system may use
    // `gatehouse`).
    let vhost = format!("gatehouse-test-{}", hex::encode(&crypto::OpeningKey::generate().unwrap()[..4]));
    let shipped = std::fs::read_to_string(repo_root().join("config/rabbitmq/definitions.json")).unwrap();
    let mut defs: Value = serde_json::from_str(&shipped).unwrap();
    defs["vhosts"] = json!([{"name": vhost}]);
    for key in ["permissions", "policies"] {
        for p in defs[key].as_array_mut().unwrap() {
            p["vhost"] = json!(vhost);
        }
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), defs.to_string()).unwrap();
    let path = file.path().to_str().unwrap().to_owned();
    tokio::task::spawn_blocking(move || broker_ctl(&["import_definitions", &path])).await.unwrap();
    let (gk_url, wk_url) =
        (url_as("gatekeeper", "gatekeeper-dev", &vhost), url_as("worker", "worker-dev", &vhost));
    let sys = TestSystem::start_with(Options {
        broker_urls: Some((gk_url.clone(), wk_url.clone())),
        prefix: Some(String::new()),
        ..Options::default()
    })
    .await;
    // With only their own rights, the two components do the whole job.
    let mut conn = sys.connect().await;
    let res =
        conn.submit(&json!({"kind": "vault.put", "payload": {"record": {"a": 1}}}), Some(10)).await.unwrap();
    assert_eq!((res.status, res.json()["status"].clone()), (200, json!("succeeded")), "{}", res.text());

    let gk = gatehouse_broker::connect(&gk_url, "e2e-as-gatekeeper").await.unwrap();
    let t = sys.topology();
    let job_queue = t.job_queue("interactive");
    let results = [
        (
            "consume a job queue",
            refusal(&gk, |ch| {
                let q = job_queue.clone();
                async move {
                    ch.basic_consume(
                        q.as_str().into(),
                        "x".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                }
            })
            .await,
        ),
        (
            "read gatehouse.dead",
            refusal(&gk, |ch| {
                let q = t.dead_queue();
                async move { ch.basic_get(q.as_str().into(), BasicGetOptions::default()).await }
            })
            .await,
        ),
        (
            "purge a job queue",
            refusal(&gk, |ch| {
                let q = job_queue.clone();
                async move { ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()).await }
            })
            .await,
        ),
        (
            "declare a queue",
            refusal(&gk, |ch| async move {
                ch.queue_declare(
                    "gatehouse.exfiltrate".into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
            })
            .await,
        ),
    ];
    for (what, outcome) in &results {
        assert!(outcome.contains("ACCESS_REFUSED"), "the gatekeeper's user could {what}: {outcome}");
    }

    let wk = gatehouse_broker::connect(&wk_url, "e2e-as-worker").await.unwrap();
    let publish = refusal(&wk, |ch| {
        let exchange = t.jobs_exchange();
        async move {
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
            ch.basic_publish(
                exchange.as_str().into(),
                "interactive".into(),
                opts,
                b"{}",
                BasicProperties::default(),
            )
            .await?
            .await
        }
    })
    .await;
    assert!(
        publish.contains("ACCESS_REFUSED"),
        "the worker's user could publish to gatehouse.jobs: {publish}"
    );
    println!(
        "least privilege: gatekeeper refused {:?}; worker publish to gatehouse.jobs refused",
        results.map(|r| r.0)
    );
    let _ = gk.close(200, "done".into()).await;
    let _ = wk.close(200, "done".into()).await;
    sys.stop().await;
    tokio::task::spawn_blocking(move || broker_ctl(&["delete_vhost", &vhost])).await.unwrap();
    // Both components ran in this process, logging at trace level: no broker password.
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(logs.contains("gatekeeper listening"), "logs were not captured");
    for password in ["gatekeeper-dev", "worker-dev"] {
        assert!(!logs.contains(password), "a broker password is in the logs");
    }
}

/// Waits until `n` dead letters are there; answers them.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_published_around_the_gatekeeper_is_dead_lettered_unrun() {
    captured_logs();
    let sys = TestSystem::start().await;
    let queue = sys.topology().job_queue("interactive");
    let now = gatehouse_protocol::clock::now_ms().unsigned_abs();
    // Plausible jobs, as someone with admin rights on the broker might forge them.
    let forged = |id: &str| {
        json!({"id": id, "kind": "vault.put", "client": "dev-client", "priority": 5,
               "payload": {"record": {"owner": "mallory"}}, "submitted_at_ms": now})
        .to_string()
    };
    let gk_pub = keys::read_hex(&sys.certs.path().join("gatekeeper-signing.pub")).unwrap();
    let unsigned = forged(&"a".repeat(32));
    let vouched = |v: u32, id: &str| {
        json!({
            "v": v,
            "key_id": crypto::key_id(&gk_pub),
            "session": format!("{}.{now}.{}", "09".repeat(32), "00".repeat(64)),
            "mac": "00".repeat(32),
            "message": serde_json::from_str::<Value>(&forged(id)).unwrap(),
        })
        .to_string()
    };
    let badly_signed = vouched(1, &"b".repeat(32));
    // As a gatekeeper of a later release would write it: refused by name, not as a forgery.
    let later_format = vouched(2, &"c".repeat(32));
    for body in [&unsigned, &badly_signed, &later_format] {
        assert!(management::publish_to_queue(&queue, body, json!({})).await);
    }

    let letters = dead_letters(&sys, 3).await;
    let mut reasons: Vec<_> = letters.iter().map(|l| l["reason"].as_str().unwrap_or("").to_owned()).collect();
    reasons.sort();
    assert_eq!(reasons, ["bad_signature", "bad_signature", "unsupported_version"], "{letters:?}");
    // Labelled with the id the body claims, if it has the shape of a job (unverified: a replay
    // is checked like any delivery).
    let mut ids: Vec<_> = letters.iter().map(|l| l["id"].as_str().map(str::to_owned)).collect();
    ids.sort();
    assert_eq!(ids, [None, None, Some("b".repeat(32))], "{letters:?}");
    assert_eq!(oracle::count(&sys.database(), "vault"), 0, "a forged job ran");
    assert_eq!(oracle::count(&sys.database(), "jobs"), 0, "a forged job was recorded");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sensitive_data_is_in_no_queue_dead_letter_database_file_or_log() {
    let logs = captured_logs();
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        worker_log: Some("trace"),
        ..Options::default()
    })
    .await;
    let marker = format!("MARKER-{}", hex::encode(&crypto::OpeningKey::generate().unwrap()[..8]));
    sys.worker_process().terminate();

    // Submitted while the worker is stopped: it waits in the queue, where we look at it.
    let mut conn = sys.connect().await;
    let res = conn
        .submit(&json!({"kind": "vault.put", "payload": {"record": {"secret": marker}}}), None)
        .await
        .unwrap();
    assert_eq!(res.status, 202, "{}", res.text());
    let id = res.json()["id"].as_str().unwrap().to_owned();
    let queue = sys.topology().job_queue("interactive");
    let queued = management::peek(&queue, 10).await;
    assert!(queued.contains(&id), "the job is not in the queue: {queued}");
    assert!(!queued.contains(&marker), "the broker holds the payload in the clear");

    // Two tampered copies: the sealed job altered under its genuine session and MAC, and the
    // job intact under another MAC.
    let message: Value = serde_json::from_str::<Vec<Value>>(&queued).unwrap().remove(0);
    let body = message["payload"].as_str().unwrap().to_owned();
    // The job carries no headers of its own (its provenance is in the body).
    let headers = json!({});
    let ct_at = body.find("\"ct\":\"").unwrap() + 6;
    let mut altered = body.clone();
    let flipped = if &body[ct_at..ct_at + 1] == "0" { "1" } else { "0" };
    altered.replace_range(ct_at..ct_at + 1, flipped);
    assert!(management::publish_to_queue(&queue, &altered, headers.clone()).await);
    // Only the MAC changes: the job's bytes stay exactly as the gatekeeper sent them.
    let mac_at = body.find("\"mac\":\"").unwrap() + 7;
    let mut resigned = body.clone();
    resigned.replace_range(mac_at..mac_at + 64, &"11".repeat(32));
    assert_ne!(resigned, body);
    assert!(management::publish_to_queue(&queue, &resigned, headers.clone()).await);

    sys.worker_process().start();
    let status = wait_final(&mut conn, &id, Duration::from_secs(20)).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    let token = status["result"]["token"].as_str().unwrap().to_owned();
    let got =
        conn.submit(&json!({"kind": "vault.get", "payload": {"token": token}}), Some(10)).await.unwrap();
    assert_eq!(got.json()["result"]["record"]["secret"], marker, "the record did not round-trip");

    let letters = dead_letters(&sys, 2).await;
    let reasons: Vec<_> = letters.iter().map(|l| l["reason"].clone()).collect();
    assert_eq!(reasons, [json!("bad_signature"), json!("bad_signature")], "{letters:?}");
    let dead = management::peek(&sys.topology().dead_queue(), 10).await;
    assert!(!dead.contains(&marker), "a dead letter holds the payload in the clear");

    let mut files = std::fs::read(sys.database()).unwrap();
    files.extend(std::fs::read(sys.database().with_extension("sqlite-wal")).unwrap_or_default());
    assert!(
        !String::from_utf8_lossy(&files).contains(&marker),
        "the database file holds the record in the clear"
    );

    let data_key = std::fs::read_to_string(sys.keyring()).unwrap();
    let data_key = data_key.lines().last().unwrap().split_whitespace().nth(1).unwrap().to_owned();
    let signing_key = std::fs::read_to_string(sys.certs.path().join("gatekeeper-signing.key")).unwrap();
    for (who, log) in [
        ("worker (trace)", sys.worker_process().log()),
        ("gatekeeper (trace)", String::from_utf8_lossy(&logs.lock().unwrap()).into_owned()),
    ] {
        assert!(!log.is_empty(), "no {who} log captured");
        for (what, secret) in [
            ("the payload", marker.as_str()),
            ("the data key", &data_key),
            ("a signing key", signing_key.trim()),
        ] {
            assert!(!log.contains(secret), "the {who} log contains {what}");
        }
    }
    sys.stop().await;
    println!(
        "isolation: marker {marker} absent from queue, dead letters, database, worker and gatekeeper logs; \
         tampered body and MAC dead-lettered as bad_signature"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_components_reach_the_broker_over_mutual_tls() {
    captured_logs();
    let _ = tokio::task::spawn_blocking(broker_url).await;
    let home = gatehouse_e2e::private_node_home();
    if gatehouse_devenv::broker_node::BrokerNode::at(&home).running_pid().is_none() {
        eprintln!("not checked: the test broker is not the private node, which has the TLS listener");
        return;
    }
    let tls_dir = gatehouse_devenv::broker_node::tls_dir(&home);
    let tls = |dir: &std::path::Path| gatehouse_broker::BrokerTlsSettings {
        ca: tls_dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
    };
    let url = format!("amqps://guest:guest@localhost:{}/%2f", gatehouse_devenv::broker_node::TLS_PORT);
    let sys = TestSystem::start_with(Options {
        broker_urls: Some((url.clone(), url.clone())),
        broker_tls: Some(tls(&tls_dir)),
        ..Options::default()
    })
    .await;
    let mut conn = sys.connect().await;
    let res =
        conn.submit(&json!({"kind": "vault.put", "payload": {"record": {"t": 1}}}), Some(10)).await.unwrap();
    assert_eq!((res.status, res.json()["status"].clone()), (200, json!("succeeded")), "{}", res.text());

    // Without a client certificate, or with one from another CA, the broker refuses the link.
    let settings = |tls| gatehouse_broker::BrokerSettings {
        url: gatehouse_protocol::settings::Secret::new(url.clone()),
        other_urls: Vec::new(),
        prefix: String::new(),
        tls,
    };
    let no_cert = gatehouse_broker::connect_with(&settings(None), "e2e-no-cert").await;
    assert!(no_cert.is_err(), "the broker accepted a TLS client without a certificate");
    let foreign = tempfile::tempdir().unwrap();
    gatehouse_devenv::certs::write_dev(foreign.path()).unwrap();
    let foreign_cert =
        gatehouse_broker::connect_with(&settings(Some(tls(foreign.path()))), "e2e-foreign").await;
    assert!(foreign_cert.is_err(), "the broker accepted a client certificate from another CA");
    println!(
        "broker TLS: both components over amqps with client certificates; no cert and foreign CA refused"
    );
    sys.stop().await;
}

/// A field the client seals itself (`vault.put_sealed`'s record, `"x-gatehouse-sealed"` in the
/// shipped schema) reaches only the worker: what the gatekeeper receives holds it sealed to a
/// worker key the operator certified, nothing in the clear reaches the gatekeeper's trace log
/// or the database, the worker opens it and the same client reads the record back. Sent in
/// the clear it is refused (`422 field-must-be-sealed`); copied into another client's job, or
/// sealed for another kind, field or job, it does not open (`failed: bad-seal`, unrun). A key
/// set the gatekeeper altered, or certified with a key of its own, is refused by the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_field_the_client_sealed_is_opened_only_by_the_worker() {
    use gatehouse_client::{Sealer, client_name};
    use gatehouse_protocol::fields::{self, FieldAad};
    use gatehouse_protocol::keyset::SignedKeySet;

    let logs = captured_logs();
    let sys = TestSystem::start().await;
    let marker = format!("SEALED-{}", hex::encode(&crypto::OpeningKey::generate().unwrap()[..8]));
    let catalog = gatehouse_protocol::Catalog::load(sys.catalog_path()).unwrap();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(&catalog.kind("vault.put_sealed").unwrap().schema).unwrap(),
    )
    .unwrap();
    let paths = fields::sealed_paths(&schema);
    assert_eq!(paths, ["/record"], "the shipped catalog marks the record sealed");

    let operator = keys::read_hex(&sys.certs.path().join("operator-signing.pub")).unwrap();
    let me = client_name(&sys.certs.path().join("client.pem")).unwrap();
    let mut conn = sys.connect().await;
    let served = conn.worker_keys().await.unwrap();
    let sealer = Sealer::new(&served, &operator, &me).unwrap();
    let job = |record: Value| json!({"kind": "vault.put_sealed", "payload": {"record": record}});

    // Sealed, stored and read back by the same client.
    let mut body = job(json!({"ssn": marker}));
    sealer.seal(&mut body, &paths).unwrap();
    let sent = body.to_string();
    assert!(!sent.contains(&marker), "the request the gatekeeper receives holds the field in the clear");
    let res = conn.submit(&body, Some(10)).await.unwrap();
    assert_eq!((res.status, res.json()["status"].clone()), (200, json!("succeeded")), "{}", res.text());
    let token = res.json()["result"]["token"].as_str().unwrap().to_owned();
    let got =
        conn.submit(&json!({"kind": "vault.get", "payload": {"token": token}}), Some(10)).await.unwrap();
    assert_eq!(got.json()["result"]["record"]["ssn"], marker, "{}", got.text());

    // `gatehouse submit` seals the catalog's sealed fields itself (the gatekeeper refuses them
    // in the clear, below), and a value that opens but breaks the property's schema is refused
    // by the worker, unrun.
    let cli = gatehouse_cli::commands::jobs::SubmitArgs {
        kind: "vault.put_sealed".into(),
        data: json!({"record": {"ssn": marker}}).to_string(),
        priority: None,
        seq: None,
        idempotency_key: None,
        delay: None,
        wait: Some(10),
        catalog: sys.catalog_path().to_owned(),
        operator_key: sys.certs.path().join("operator-signing.pub"),
    };
    assert!(
        gatehouse_cli::commands::jobs::submit(&sys.endpoint(), &cli, true).await.unwrap(),
        "gatehouse submit"
    );
    let mut not_a_record = job(json!("not a record"));
    sealer.seal(&mut not_a_record, &paths).unwrap();
    let res = conn.submit(&not_a_record, Some(10)).await.unwrap();
    assert_eq!(res.json()["status"], "failed", "{}", res.text());
    assert!(
        res.json()["error"].as_str().unwrap().starts_with("invalid-payload at /payload/record"),
        "{}",
        res.text()
    );

    // In the clear, or sealed without the idempotency key it is bound to: refused at the edge.
    let plain = conn.submit(&job(json!({"ssn": "x"})), None).await.unwrap();
    assert_problem(&plain, 422, "field-must-be-sealed");
    let mut keyless = body.clone();
    keyless.as_object_mut().unwrap().remove("idempotency_key");
    assert_problem(&conn.submit(&keyless, None).await.unwrap(), 422, "idempotency-key-required");

    // Moved: into another client's job, or sealed for another kind, field or job.
    let key = body["idempotency_key"].as_str().unwrap().to_owned();
    let (worker_key, _) =
        served.current(&operator, u64::try_from(gatehouse_protocol::clock::now_ms()).unwrap()).unwrap();
    let sealed_for = |aad: FieldAad<'_>| fields::seal(&worker_key, &aad, &json!({"ssn": marker})).unwrap();
    let base = FieldAad { client: &me, kind: "vault.put_sealed", path: "/record", idempotency_key: &key };
    let mut moved = Vec::new();
    let mut other = sys.client_as(gatehouse_e2e::OTHER_CLIENT).connect().await.unwrap();
    let res = other.submit(&body, Some(10)).await.unwrap();
    moved.push(("another client's job", res.json()));
    // Each in a job of its own (a fresh idempotency key: the same key would be the same job).
    let original = body["payload"]["record"].clone();
    for (n, (what, sealed)) in [
        (
            "another kind",
            json!(sealed_for(FieldAad { kind: "vault.put", idempotency_key: "moved-1", ..base })),
        ),
        ("another field", json!(sealed_for(FieldAad { path: "/note", idempotency_key: "moved-2", ..base }))),
        ("another job", original),
    ]
    .into_iter()
    .enumerate()
    {
        let mut copy = body.clone();
        copy["payload"]["record"] = sealed;
        copy["idempotency_key"] = json!(format!("moved-{}", n + 1));
        let res = conn.submit(&copy, Some(10)).await.unwrap();
        moved.push((what, res.json()));
    }
    for (what, answer) in &moved {
        assert_eq!(answer["status"], "failed", "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("bad-seal at /payload/record"), "{what}: {answer}");
        assert!(!error.contains(&marker), "{what}: {answer}");
    }

    // A gatekeeper that swaps in a key of its own: by altering the set, or certifying its own.
    let mine = crypto::OpeningKey::from_bytes(&crypto::OpeningKey::generate().unwrap()).unwrap().public_key();
    let now = u64::try_from(gatehouse_protocol::clock::now_ms()).unwrap();
    let its_own = gatehouse_protocol::keyset::WorkerKey::new(&mine, 0, now + 3_600_000).unwrap();
    let mut altered = served.clone();
    use base64::Engine as _;
    altered.set =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&[&its_own]).unwrap());
    let gatekeeper_key = keys::signing_key(&sys.certs.path().join("gatekeeper-signing.key")).unwrap();
    let recertified = SignedKeySet::certify(&gatekeeper_key, &[its_own]).unwrap();
    for (what, set) in [("altered", &altered), ("certified by the gatekeeper's key", &recertified)] {
        let refused = Sealer::new(set, &operator, &me).unwrap_err().to_string();
        assert!(refused.contains("not one the operator certified"), "{what}: {refused}");
    }

    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(!log.is_empty() && !log.contains(&marker), "the gatekeeper's trace log holds the sealed field");
    let mut files = std::fs::read(sys.database()).unwrap();
    files.extend(std::fs::read(sys.database().with_extension("sqlite-wal")).unwrap_or_default());
    assert!(!String::from_utf8_lossy(&files).contains(&marker), "the database holds the field in the clear");
    sys.stop().await;
    println!(
        "sealed fields: stored and read back; plaintext 422; moved to another client, kind, field, job: bad-seal x{}; \
         altered and re-certified key sets refused",
        moved.len()
    );
}
