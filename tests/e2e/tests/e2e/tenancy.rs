//! Tenancy and binding: no client reads or changes another client's data, and nobody with
//! broker access (the management UI's admin) can redirect a reply, replay a job or make it
//! jump the queue. One test per finding of the review (issue 13); `mallory` is a second client
//! with the same rights as `dev-client` (alice), the management API the broker-side attacker.

use std::time::{Duration, Instant};

use gatehouse_cli::commands::dlq::{self, BrokerArgs};
use gatehouse_client::{Client, Identity, Method, tls_config};
use gatehouse_e2e::{
    Options, TestSystem, assert_problem, broker_ctl, broker_url, dead_letters, management, oracle, wait_final,
};
use gatehouse_protocol::{crypto, hex};
use serde_json::{Value, json};

const MALLORY: &str = "mallory";
const MALLORY_POLICY: &str = "[[client]]\nidentity = \"mallory\"\nkinds = [\"*\"]\nmax_priority = 9\n";

fn with_mallory(worker_process: bool) -> Options {
    Options {
        worker_binary: worker_process.then_some(env!("CARGO_BIN_EXE_e2e-worker")),
        extra_clients: &[MALLORY],
        extra_policy: MALLORY_POLICY,
        ..Options::default()
    }
}

/// Alice (dev-client) stores a record holding a fresh marker: (her connection, marker, token).
async fn alice_stores_a_secret(sys: &TestSystem) -> (gatehouse_client::Connection, String, String) {
    let secret = marker();
    let mut alice = sys.connect().await;
    let put = alice
        .submit(&json!({"kind": "vault.put", "payload": {"record": {"s": secret}}}), Some(10))
        .await
        .unwrap();
    let token = put.json()["result"]["token"].as_str().unwrap().to_owned();
    (alice, secret, token)
}

fn marker() -> String {
    format!("MARKER-{}", hex::encode(&crypto::OpeningKey::generate().unwrap()[..8]))
}

/// The messages waiting in `queue` (read and put back), once there are `n`.
async fn queued(queue: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let msgs: Vec<Value> = serde_json::from_str(&management::peek(queue, 100).await).unwrap();
        if msgs.len() >= n {
            return msgs;
        }
        assert!(Instant::now() < deadline, "{} of {n} messages in {queue}", msgs.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn body_of(msg: &Value) -> String {
    msg["payload"].as_str().unwrap().to_owned()
}

/// The job id in a queued message's (vouched) body.
fn job_id_of(msg: &Value) -> String {
    let body: Value = serde_json::from_str(&body_of(msg)).unwrap();
    body["message"]["id"].as_str().unwrap().to_owned()
}

fn reasons(letters: &[Value]) -> Vec<String> {
    let mut r: Vec<String> = letters.iter().map(|l| l["reason"].as_str().unwrap_or("").to_owned()).collect();
    r.sort();
    r
}

/// Finding 1, the exploit as reported: with only the management API, an attacker re-publishes
/// alice's queued `vault.get` with mallory's pending reply target. Mallory's waiting request
/// must never receive alice's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_captured_job_cannot_answer_another_clients_waiting_request() {
    let sys = TestSystem::start_with(with_mallory(true)).await;
    let (mut alice, secret, token) = alice_stores_a_secret(&sys).await;
    sys.worker_process().terminate();

    let get = alice.submit(&json!({"kind": "vault.get", "payload": {"token": token}}), None).await.unwrap();
    assert_eq!(get.status, 202, "{}", get.text());
    let alice_job = get.json()["id"].as_str().unwrap().to_owned();
    let mallory = sys.client_as(MALLORY);
    let waiting = tokio::spawn(async move {
        let mut c = mallory.connect().await.unwrap();
        c.submit(&json!({"kind": "vault.put", "payload": {"record": {"m": 1}}}), Some(12)).await.unwrap()
    });

    // The attacker reads both from their queues (mallory, the policy's third client, queues in
    // fair shard 2) and takes mallory's own job away, so that only the forgery could answer her.
    let queue = sys.topology().job_queue("interactive");
    let mallory_queue = sys.topology().job_queue("interactive.s2");
    let (alice_msg, mallory_msg) = (&queued(&queue, 1).await[0], &queued(&mallory_queue, 1).await[0]);
    assert_eq!(job_id_of(alice_msg), alice_job);
    assert_eq!(management::take(&queue, 1).await.len(), 1);
    assert_eq!(management::take(&mallory_queue, 1).await.len(), 1);
    // Mallory's reply target: AMQP properties before the fix, inside the vouched body after.
    let props = &mallory_msg["properties"];
    let body: Value = serde_json::from_str(&body_of(mallory_msg)).unwrap();
    let reply_to =
        props["reply_to"].as_str().or(body["message"]["reply"]["queue"].as_str()).unwrap().to_owned();
    let cid = props["correlation_id"]
        .as_str()
        .or(body["message"]["reply"]["correlation_id"].as_str())
        .unwrap()
        .to_owned();

    // 1. Alice's job as it was, at its own priority, with mallory's reply target as properties.
    let priority = alice_msg["properties"]["priority"].clone();
    let redirect =
        json!({"priority": priority, "delivery_mode": 2, "reply_to": reply_to, "correlation_id": cid});
    assert!(management::publish_with(&queue, &body_of(alice_msg), redirect.clone()).await);
    // 2. The same with mallory's reply target written into the vouched body.
    let mut rewritten: Value = serde_json::from_str(&body_of(alice_msg)).unwrap();
    rewritten["message"]["reply"] = json!({"queue": reply_to, "correlation_id": cid});
    assert!(management::publish_with(&queue, &rewritten.to_string(), redirect).await);

    sys.worker_process().start();
    let answer = waiting.await.unwrap();
    assert!(!answer.text().contains(&secret), "alice's record reached mallory: {}", answer.text());
    assert_eq!(answer.status, 202, "mallory was answered by someone else's job: {}", answer.text());
    // Alice's job ran once, for alice; the rewritten copy was refused unread.
    assert_eq!(reasons(&dead_letters(&sys, 1).await), ["bad_signature"]);
    let s = wait_final(&mut sys.connect().await, &alice_job, Duration::from_secs(10)).await;
    assert_eq!(s["result"]["record"]["s"], secret, "{s}");
    sys.stop().await;
}

/// Finding 2: accounts, their sequence numbers and vault records are each client's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_cannot_observe_or_affect_anothers_ledger_or_vault() {
    let sys = TestSystem::start_with(with_mallory(false)).await;
    let mut alice = sys.connect().await;
    let mut mallory = sys.client_as(MALLORY).connect().await.unwrap();
    let apply = |n: u64, amount: i64| json!({"kind": "ledger.apply", "payload": {"account": "acct-1", "amount": amount}, "sequence": {"key": "acct-1", "number": n}});
    let balance = json!({"kind": "ledger.balance", "payload": {"account": "acct-1"}});
    let r = alice.submit(&apply(1, 100), Some(10)).await.unwrap().json();
    assert_eq!(r["result"]["balance"], 100, "{r}");

    // Mallory sees nothing of alice's account, and her writes to "acct-1" are her own.
    let r = mallory.submit(&balance, Some(10)).await.unwrap().json();
    assert_eq!(
        (r["result"]["balance"].clone(), r["result"]["sequence"].clone()),
        (json!(0), json!(0)),
        "{r}"
    );
    let r = mallory.submit(&apply(1, -50), Some(10)).await.unwrap().json();
    assert_eq!(r["result"]["balance"], -50, "{r}");
    let r = mallory.submit(&apply(2, -50), Some(10)).await.unwrap().json();
    assert_eq!(r["status"], "succeeded", "mallory squatting alice's next number: {r}");
    // Alice's account and her next number are untouched.
    let r = alice.submit(&apply(2, 1), Some(10)).await.unwrap().json();
    assert_eq!(r["result"], json!({"account": "acct-1", "balance": 101, "sequence": 2}), "{r}");
    let ledger = oracle::ledger_by_owner(&sys.database(), &sys.keyring());
    assert_eq!(ledger[&("dev-client".to_owned(), "acct-1".to_owned())], (101, 2));
    assert_eq!(ledger[&(MALLORY.to_owned(), "acct-1".to_owned())], (-100, 2));

    // Alice's vault token is "not found" for mallory, to read and to delete.
    let put = alice
        .submit(&json!({"kind": "vault.put", "payload": {"record": {"a": 1}}}), Some(10))
        .await
        .unwrap()
        .json();
    let token = put["result"]["token"].as_str().unwrap().to_owned();
    let r = mallory
        .submit(&json!({"kind": "vault.get", "payload": {"token": token}}), Some(10))
        .await
        .unwrap()
        .json();
    assert_eq!((r["status"].as_str(), r.get("result")), (Some("failed"), None), "{r}");
    let r = mallory
        .submit(&json!({"kind": "vault.delete", "payload": {"token": token}}), Some(10))
        .await
        .unwrap()
        .json();
    assert_eq!(r["result"]["deleted"], false, "{r}");
    let r = alice
        .submit(&json!({"kind": "vault.get", "payload": {"token": token}}), Some(10))
        .await
        .unwrap()
        .json();
    assert_eq!(r["result"]["record"], json!({"a": 1}), "{r}");
    sys.stop().await;
}

/// Finding 3: a replay marker without an operator's grant (or with a grant by a key the worker
/// does not trust) is refused back to the dead-letter queue; the operator's signed replay runs
/// the job once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_an_operator_signed_replay_reruns_a_dead_lettered_job() {
    let sys = TestSystem::start_with(Options { gap_timeout_s: Some(1), ..Options::default() }).await;
    let mut conn = sys.connect().await;
    let job = |n: u64, amount: i64| json!({"kind": "ledger.apply", "payload": {"account": "rp", "amount": amount}, "sequence": {"key": "rp", "number": n}});
    let second = conn.submit(&job(2, 10), None).await.unwrap().json()["id"].as_str().unwrap().to_owned();
    let s = wait_final(&mut conn, &second, Duration::from_secs(15)).await;
    assert_eq!(s["reason"], "sequence_gap_timeout", "{s}");
    let first = conn.submit(&job(1, 1), Some(10)).await.unwrap().json();
    assert_eq!(first["result"]["balance"], 1, "{first}");

    // The attacker copies the dead letter back with the old marker, and with a grant of its own.
    let dead = management::peek(&sys.topology().dead_queue(), 1).await;
    let letter: Value = serde_json::from_str::<Vec<Value>>(&dead).unwrap().remove(0);
    let body = body_of(&letter);
    let priority = letter["properties"]["priority"].clone();
    let queue = sys.topology().job_queue("batch");
    let queue = if sys.topology().job_queue("interactive")
        == letter["properties"]["headers"]["x-gatehouse-original-queue"].as_str().unwrap_or("")
    {
        sys.topology().job_queue("interactive")
    } else {
        queue
    };
    let mallory_key = crypto::SigningKey::from_pkcs8(&crypto::SigningKey::generate_pkcs8().unwrap()).unwrap();
    let now = gatehouse_protocol::clock::now_ms().unsigned_abs();
    for grant in
        ["true".to_owned(), gatehouse_protocol::replay::grant(&mallory_key, &second, 1, body.as_bytes(), now)]
    {
        let props =
            json!({"priority": priority, "delivery_mode": 2, "headers": {"x-gatehouse-replay": grant}});
        assert!(management::publish_with(&queue, &body, props).await);
    }
    let letters = dead_letters(&sys, 3).await;
    assert_eq!(
        reasons(&letters),
        ["replay_refused", "replay_refused", "sequence_gap_timeout"],
        "{letters:?}"
    );
    let s = wait_final(&mut conn, &second, Duration::from_secs(5)).await;
    assert_eq!(s["status"], "dead_lettered", "an unauthorised replay ran the job: {s}");
    assert_eq!(oracle::ledger(&sys.database(), &sys.keyring())["rp"], (1, 1));

    // The operator's replay, signed with the key the worker trusts, runs it once.
    let args = BrokerArgs { broker: broker_url(), prefix: sys.prefix.clone() };
    let operator = sys.operator_key();
    let replayed = dlq::replay(&args, Some(&second), &operator).await.unwrap();
    // Only the worker's own dead letter of the job carries its verified id and dead count; the
    // refused copies (anyone's message_id) are not replayed.
    assert_eq!(replayed, std::slice::from_ref(&second), "replayed by verified id");
    // Its status says dead_lettered (final) until the replayed copy has run: wait for that.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let s = loop {
        let s = wait_final(&mut conn, &second, Duration::from_secs(15)).await;
        if s["status"] != "dead_lettered" || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(s["result"], json!({"account": "rp", "balance": 11, "sequence": 2}), "{s}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(oracle::ledger(&sys.database(), &sys.keyring())["rp"], (11, 2), "applied more than once");
    sys.stop().await;
}

/// Finding 6: a copy of a queued job re-published at priority 9, or into another class's
/// queue, does not run (early); the job itself runs once, in its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_with_other_priority_or_queue_is_dead_lettered_unrun() {
    let sys = TestSystem::start_with(with_mallory(true)).await;
    sys.worker_process().terminate();
    let mut alice = sys.connect().await;
    let job = json!({"kind": "vault.put", "priority": 1, "payload": {"record": {"a": 1}}});
    let id = alice.submit(&job, None).await.unwrap().json()["id"].as_str().unwrap().to_owned();
    let queue = sys.topology().job_queue("interactive");
    let msg = queued(&queue, 1).await.remove(0);
    assert_eq!(msg["properties"]["priority"], 1);
    assert!(
        management::publish_with(&queue, &body_of(&msg), json!({"priority": 9, "delivery_mode": 2})).await
    );
    let other = sys.topology().job_queue("batch");
    assert!(
        management::publish_with(&other, &body_of(&msg), json!({"priority": 1, "delivery_mode": 2})).await
    );
    sys.worker_process().start();
    let s = wait_final(&mut alice, &id, Duration::from_secs(15)).await;
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(reasons(&dead_letters(&sys, 2).await), ["misrouted", "misrouted"]);
    assert_eq!(oracle::count(&sys.database(), "vault"), 1, "a copy ran");
    sys.stop().await;
}

/// Finding 5 end to end: a vault record whose owner column is edited in the worker's database
/// does not open for the new owner (the job fails, it never answers the record).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_moved_to_another_owner_in_the_database_does_not_open() {
    let sys = TestSystem::start_with(with_mallory(false)).await;
    let (_alice, secret, token) = alice_stores_a_secret(&sys).await;
    rusqlite::Connection::open(sys.database())
        .unwrap()
        .execute("UPDATE vault SET owner = 'mallory' WHERE token = ?1", [&token])
        .unwrap();
    let mut mallory = sys.client_as(MALLORY).connect().await.unwrap();
    let r = mallory.submit(&json!({"kind": "vault.get", "payload": {"token": token}}), None).await.unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let s = wait_final(&mut mallory, &id, Duration::from_secs(30)).await;
    assert!(!s.to_string().contains(&secret), "the moved record opened for mallory: {s}");
    assert_eq!(s["status"], "dead_lettered", "{s}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(sys.database()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    sys.stop().await;
}

/// Writes certificates that try to pass as someone: no CN but a SAN naming `dev-client`, and a
/// CN with a control character.
fn impostors(dir: &std::path::Path) {
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    let issuer =
        Issuer::from_ca_cert_pem(&std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca_key).unwrap();
    let write = |name: &str, p: CertificateParams| {
        let key = KeyPair::generate().unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), p.signed_by(&key, &issuer).unwrap().pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    let base = || {
        let mut p = CertificateParams::new(Vec::new()).unwrap();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p
    };
    let mut san_only = base();
    san_only.distinguished_name = rcgen::DistinguishedName::new();
    san_only.subject_alt_names = vec![SanType::DnsName("dev-client".try_into().unwrap())];
    write("sanonly", san_only);
    let mut control = base();
    control.distinguished_name.push(DnType::CommonName, "dev-client\u{7}");
    write("controlcn", control);
}

/// Finding 7: one identity source (exactly one readable CN), and separate CAs for API clients
/// and for the components' broker certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_one_readable_cn_names_a_client_and_component_certificates_are_no_clients() {
    let sys = TestSystem::start_with(Options { prepare_certs: Some(impostors), ..Options::default() }).await;
    let dir = sys.certs.path();
    let job = json!({"kind": "vault.put", "payload": {"record": {"a": 1}}}).to_string().into_bytes();
    for name in ["sanonly", "controlcn", "gatekeeper-amqp", "worker-amqp"] {
        let identity =
            Identity { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
        let client =
            Client::with_tls(&sys.url(), tls_config(&dir.join("ca.pem"), Some(&identity)).unwrap()).unwrap();
        let outcome = match client.connect().await {
            Err(e) => Err(e),
            Ok(mut c) => {
                c.request(Method::POST, "/v1/jobs", &[("content-type", "application/json")], job.clone())
                    .await
            }
        };
        if let Ok(res) = outcome {
            panic!("{name} was served as a client: {} {}", res.status, String::from_utf8_lossy(&res.body));
        }
    }
    // The components' certificates come from their own CA, not the API's.
    let api_ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let components_ca = std::fs::read_to_string(dir.join("components-ca.pem")).unwrap();
    assert_ne!(api_ca, components_ca);
    // Control: the real dev-client still gets in.
    let res = sys
        .connect()
        .await
        .request(Method::POST, "/v1/jobs", &[("content-type", "application/json")], job)
        .await
        .unwrap();
    assert_eq!(res.status, 202);
    sys.stop().await;
}

/// Finding 8: status queries obey the policy (a client removed from it reads nothing, and
/// queries count against its rate); a client's parked jobs are capped; a full dead-letter queue
/// loses nothing (the job waits in its queue until there is room).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_queries_obey_policy_and_parked_and_dead_letters_are_bounded() {
    let sys = TestSystem::start_with(Options {
        extra_clients: &["limited"],
        extra_policy: "[[client]]\nidentity = \"limited\"\nkinds = [\"*\"]\nmax_priority = 9\nrate_per_s = 0.1\nburst = 2\n",
        max_parked_per_client: Some(2),
        ..Options::default()
    })
    .await;
    let mut limited = sys.client_as("limited").connect().await.unwrap();
    let r = limited
        .submit(&json!({"kind": "vault.put", "payload": {"record": {"a": 1}}}), Some(10))
        .await
        .unwrap();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let r = limited.request(Method::GET, &format!("/v1/jobs/{id}"), &[], Vec::new()).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = limited.request(Method::GET, &format!("/v1/jobs/{id}"), &[], Vec::new()).await.unwrap();
    assert_eq!(r.status, 429, "status queries are not rate-limited");

    // Removed from the policy: its own job's status is refused.
    let mut alice = sys.connect().await;
    let r =
        alice.submit(&json!({"kind": "vault.put", "payload": {"record": {"a": 1}}}), Some(10)).await.unwrap();
    let alice_job = r.json()["id"].as_str().unwrap().to_owned();
    std::fs::write(sys.policy_file(), "").unwrap();
    assert!(sys.policy.reload());
    let r = alice.request(Method::GET, &format!("/v1/jobs/{alice_job}"), &[], Vec::new()).await.unwrap();
    assert_problem(&r, 403, "unknown-client");
    sys.stop().await;

    // Parked jobs: at most 2 per client; the third is dead-lettered (replayable), not parked.
    let sys = TestSystem::start_with(Options { max_parked_per_client: Some(2), ..Options::default() }).await;
    let mut conn = sys.connect().await;
    let mut ids = Vec::new();
    for n in [2, 3, 4] {
        let j = json!({"kind": "ledger.apply", "payload": {"account": "p", "amount": 1}, "sequence": {"key": "p", "number": n}});
        ids.push(conn.submit(&j, None).await.unwrap().json()["id"].as_str().unwrap().to_owned());
    }
    let s = wait_final(&mut conn, &ids[2], Duration::from_secs(10)).await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("dead_lettered"), Some("parked_limit")),
        "{s}"
    );
    assert_eq!(oracle::count(&sys.database(), "parked"), 2);

    // The dead-letter queue is bounded by the shipped policy, with reject-publish...
    let dead = sys.topology().dead_queue();
    // (The management API shows a queue's policy with its next statistics, within seconds.)
    let deadline = Instant::now() + Duration::from_secs(15);
    let effective = loop {
        let (status, info) = management::call("GET", &format!("/api/queues/%2f/{dead}"), None).await;
        assert_eq!(status, 200, "{info}");
        let effective = serde_json::from_str::<Value>(&info).unwrap()["effective_policy_definition"].clone();
        if effective.is_object() || Instant::now() > deadline {
            break effective;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        (effective["max-length"].as_u64(), effective["overflow"].as_str()),
        (Some(1_000_000), Some("reject-publish")),
        "{effective}"
    );
    // ... and when it is full, the next dead letter waits in its job queue: nothing is lost.
    let limit = json!({"queue-version": 2, "max-length": 1, "overflow": "reject-publish"}).to_string();
    let pattern = format!("^{}$", dead.replace('.', "\\."));
    let policy = format!("{}tiny-dlq", sys.prefix);
    broker_ctl(&[
        "set_policy",
        "-p",
        "/",
        "--apply-to",
        "queues",
        "--priority",
        "5",
        &policy,
        &pattern,
        &limit,
    ]);
    assert_eq!(sys.queue_depth(&dead).await, 1, "the parked_limit dead letter");
    let queue = sys.topology().job_queue("interactive");
    assert!(management::publish_with(&queue, r#"{"forged":1}"#, json!({"delivery_mode": 2})).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sys.queue_depth(&dead).await, 1, "the full dead-letter queue took more");
    broker_ctl(&["clear_policy", "-p", "/", &policy]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while sys.queue_depth(&dead).await < 2 {
        assert!(Instant::now() < deadline, "the forged job was lost instead of waiting for room");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sys.stop().await;
}
