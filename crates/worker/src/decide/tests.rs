//! The decisions against a real SQLite file, without a broker.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use gatehouse_protocol::crypto::{OpeningKey, Session, SigningKey, Verifier};
use gatehouse_protocol::submit::{RawSequence, owned_key};
use gatehouse_protocol::{Catalog, JobId, Priority, Sequence, Vouched};
use gatehouse_storage::Store;
use serde_json::json;

use super::*;
use crate::handlers::Kinds;
use crate::security::Sessions;

fn kinds(catalog: &Catalog) -> Kinds {
    let mut registry = crate::handlers::Registry::builtins();
    crate::handlers::testing::register(&mut registry);
    Kinds {
        registry,
        schemas: gatehouse_protocol::schemas::Schemas::compile(catalog).unwrap(),
        fields: gatehouse_protocol::fields::FieldOpener::new(Vec::new()),
        parent_results: catalog.kinds().filter(|k| k.parent_results).map(|k| k.name.clone()).collect(),
    }
}

fn catalog() -> Catalog {
    Catalog::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml")).unwrap()
}

fn ledger_job(n: u8, number: u64, amount: i64) -> JobEnvelope {
    JobEnvelope {
        id: JobId::from_bytes([n; 16]),
        kind: "ledger.apply".into(),
        client: "c".into(),
        priority: Priority::new(3).unwrap(),
        sequence: Some(Sequence::parse(RawSequence { key: "acct".into(), number }).unwrap()),
        payload: json!({"account": "acct", "amount": amount}),
        submitted_at_ms: 0,
        not_before_ms: None,
        reply: None,
        trace_id: None,
        span_id: None,
        shard: 0,
        share: 1,
        idempotency_key: None,
        completes: None,
        after: Vec::new(),
        on_parent_failure: gatehouse_protocol::envelope::ParentFailure::Cancel,
    }
}

/// A gatekeeper session and the worker's side of it, shared by these tests.
struct TestKeys {
    session: Session,
    sessions: Sessions,
}

fn keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let gk = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let worker = OpeningKey::from_bytes(&[7; 32]).unwrap();
        let session = Session::start(&gk, &worker.public_key(), 1).unwrap();
        let sessions = Sessions::new(Verifier::new([gk.public_key()]).unwrap(), worker);
        TestKeys { session, sessions }
    })
}

fn store(dir: &tempfile::TempDir) -> Store {
    let keyring = gatehouse_protocol::crypto::Keyring::parse(&format!("k1 {}", "ab".repeat(32))).unwrap();
    Store::open_sqlite(&dir.path().join("db"), keyring, crate::handlers::Registry::builtins().families())
        .unwrap()
}

/// Delivers `env` as the consumer would for a storage kind, without a broker.
async fn deliver(store: &Store, env: JobEnvelope) -> Vec<Answer> {
    let catalog = catalog();
    let session = &keys().session;
    let raw = Vouched::wrap(session, &serde_json::to_vec(&env.seal(session).unwrap()).unwrap()).unwrap();
    store
        .transact(move |tx| -> Result<_, ApplyError> {
            let spec = catalog.kind(&env.kind).unwrap().clone();
            let target = ReplyTarget::default();
            let arrival = Arrival {
                env: env.clone(),
                raw: raw.clone(),
                target,
                replay: None,
                caps: ClientCaps::default(),
                turn_lease: None,
            };
            match decide_and_run(tx, &catalog, &kinds(&catalog), &spec, &keys().sessions, &arrival)? {
                Verdict::Answered(a) => Ok(a),
                d => panic!("unexpected {d:?}"),
            }
        })
        .await
        .unwrap()
}

fn states(answers: &[Answer]) -> Vec<JobState> {
    answers.iter().map(|a| a.status.status).collect()
}

#[test]
fn turns_are_per_kind_or_per_clients_own_key_value_with_the_kinds_limit() {
    let catalog = catalog();
    let kind = catalog.kind("test.singleton").unwrap().clone();
    let env = |client: &str, group: &str| JobEnvelope {
        kind: "test.singleton".into(),
        client: client.into(),
        sequence: None,
        payload: json!({"ms": 1, "group": group}),
        ..ledger_job(1, 1, 0)
    };
    assert_eq!(turn(&kind, &env("a", "x")), Some(("test.singleton".into(), 1)));
    assert_eq!(turn(&kind, &env("b", "y")), turn(&kind, &env("a", "x")), "one per kind");
    let by_group = KindSpec { singleton: false, singleton_key: Some("group".into()), ..kind.clone() };
    assert_eq!(turn(&by_group, &env("a", "x")), turn(&by_group, &env("a", "x")));
    assert_ne!(turn(&by_group, &env("a", "x")), turn(&by_group, &env("a", "y")));
    assert_ne!(
        turn(&by_group, &env("a", "x")),
        turn(&by_group, &env("b", "x")),
        "clients' values are their own"
    );
    let four = KindSpec { singleton: false, max_running: Some(4), ..kind.clone() };
    assert_eq!(turn(&four, &env("a", "x")), Some(("test.singleton".into(), 4)));
    let plain = KindSpec { singleton: false, ..kind };
    assert_eq!(turn(&plain, &env("a", "x")), None);
}

#[tokio::test]
async fn out_of_order_numbers_apply_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);

    let a = deliver(&store, ledger_job(3, 3, 100)).await;
    assert_eq!(states(&a), [JobState::WaitingForSequence]);
    assert_eq!(a[0].status.expected, Some(1));
    let a = deliver(&store, ledger_job(2, 2, 10)).await;
    assert_eq!(states(&a), [JobState::WaitingForSequence]);

    let a = deliver(&store, ledger_job(1, 1, 1)).await;
    assert_eq!(states(&a), [JobState::Succeeded; 3]);
    let balances: Vec<_> = a.iter().map(|a| a.status.result.as_ref().unwrap()["balance"].clone()).collect();
    assert_eq!(balances, [json!(1), json!(11), json!(111)]);

    // Redelivery of an applied job: same answer, no second effect.
    let again = deliver(&store, ledger_job(2, 2, 10)).await;
    assert_eq!(again[0].status.result.as_ref().unwrap()["balance"], json!(11));
    let (balance, seq) =
        store.transact(|tx| crate::handlers::ledger::balance_of(tx, &owned_key("c", "acct"))).await.unwrap();
    assert_eq!((balance, seq), (111, 3));
}

#[tokio::test]
async fn another_job_claiming_a_used_number_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    deliver(&store, ledger_job(1, 1, 5)).await;
    let a = deliver(&store, ledger_job(9, 1, 500)).await;
    assert_eq!(states(&a), [JobState::Failed]);
    assert!(a[0].status.error.as_ref().unwrap().starts_with("sequence_conflict"));
    let (balance, _) =
        store.transact(|tx| crate::handlers::ledger::balance_of(tx, &owned_key("c", "acct"))).await.unwrap();
    assert_eq!(balance, 5);
}

#[tokio::test]
async fn a_decided_job_keeps_no_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let attempts = |id: JobId| store.transact(move |tx| tx.attempts(&id));
    // A storage job that failed once (its count recorded apart), then succeeds.
    let env = ledger_job(1, 1, 5);
    let (id, client) = (env.id.clone(), env.client.clone());
    store.transact(move |tx| tx.record_failed_attempt(&id, &client, "busy")).await.unwrap();
    assert_eq!(attempts(env.id.clone()).await.unwrap().unwrap().count, 1);
    assert_eq!(states(&deliver(&store, env.clone()).await), [JobState::Succeeded]);
    assert_eq!(attempts(env.id.clone()).await.unwrap(), None);
    // A first-time storage job leaves none either.
    let env = ledger_job(2, 2, 5);
    deliver(&store, env.clone()).await;
    assert_eq!(attempts(env.id).await.unwrap(), None);
    // An external handler's counted attempt is forgotten once its outcome is recorded.
    let catalog = Arc::new(catalog());
    let env = JobEnvelope { kind: "test.sleep".into(), sequence: None, ..ledger_job(3, 1, 0) };
    let (id, client) = (env.id.clone(), env.client.clone());
    store.transact(move |tx| tx.begin_attempt(&id, &client)).await.unwrap();
    let recorded = store
        .transact(move |tx| {
            let target = ReplyTarget::default();
            let run = Run { catalog: &catalog, kinds: &kinds(&catalog), sessions: &keys().sessions };
            run.record_outcome(tx, &env, Outcome::Success(json!({})), &target)
        })
        .await
        .unwrap();
    assert_eq!(states(&recorded), [JobState::Succeeded]);
    assert_eq!(attempts(JobId::from_bytes([3; 16])).await.unwrap(), None);
}

#[tokio::test]
async fn attempts_are_counted_before_running_and_exhaust() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let catalog = catalog();
    let mut spec = catalog.kind("vault.put").unwrap().clone();
    spec.max_attempts = 2;
    let env = JobEnvelope { kind: "vault.put".into(), sequence: None, ..ledger_job(7, 1, 0) };
    let step = |spec: KindSpec, env: JobEnvelope| {
        store.transact(move |tx| {
            let arrival = Arrival {
                env: env.clone(),
                raw: b"{}".to_vec(),
                target: ReplyTarget::default(),
                replay: None,
                caps: ClientCaps::default(),
                turn_lease: None,
            };
            prepare(tx, &spec, &arrival)
        })
    };
    // Two starts that never finished (crashes), then the third delivery is exhausted.
    let begin = |env: JobEnvelope| store.transact(move |tx| tx.begin_attempt(&env.id, &env.client));
    assert_eq!(step(spec.clone(), env.clone()).await.unwrap(), Step::Run { suspect: false });
    assert_eq!(begin(env.clone()).await.unwrap(), 1);
    assert_eq!(step(spec.clone(), env.clone()).await.unwrap(), Step::Run { suspect: true });
    assert_eq!(begin(env.clone()).await.unwrap(), 2);
    let error = Some("the worker stopped while running it".to_owned());
    assert_eq!(
        step(spec.clone(), env.clone()).await.unwrap(),
        Step::Decided(Verdict::DeadLetter(Dead {
            reason: DeadReason::MaxAttempts,
            error,
            attempts: 2,
            record: true
        }))
    );
}

#[tokio::test]
async fn status_is_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    deliver(&store, ledger_job(1, 1, 5)).await;
    let id = JobId::from_bytes([1; 16]);
    let (i2, i3) = (id.clone(), id.clone());
    let mine = store.transact(move |tx| status_for(tx, &i2, "c")).await.unwrap();
    assert_eq!(mine.status, JobState::Succeeded);
    let theirs = store.transact(move |tx| status_for(tx, &i3, "other")).await.unwrap();
    assert_eq!(theirs.status, JobState::NotFound);
}

#[test]
fn a_failed_attempt_is_retried_with_doubling_backoff_then_dead_lettered() {
    let mut spec = catalog().kind("vault.put").unwrap().clone();
    spec.max_attempts = 4;
    spec.retry_backoff_ms = 1_000;
    let delays: Vec<_> = (1..4)
        .map(|n| match after_failure(&spec, n, "boom".into()) {
            Verdict::Retry { attempt, delay_ms, .. } => (attempt, delay_ms),
            v => panic!("{v:?}"),
        })
        .collect();
    assert_eq!(delays, [(1, 1_000), (2, 2_000), (3, 4_000)]);
    let Verdict::DeadLetter(dead) = after_failure(&spec, 4, "boom".into()) else { panic!("retried") };
    assert_eq!((dead.reason, dead.attempts, dead.record), (DeadReason::MaxAttempts, 4, true));
    spec.retry_backoff_ms = 60_000;
    spec.max_attempts = 30;
    let Verdict::Retry { delay_ms, .. } = after_failure(&spec, 29, "boom".into()) else { panic!() };
    assert_eq!(delay_ms, MAX_RETRY_DELAY_MS, "capped");
}

#[tokio::test]
async fn a_job_waits_for_its_parents_then_runs_or_ends_cancelled_when_one_failed() {
    use gatehouse_protocol::envelope::ParentFailure;
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let parent = ledger_job(40, 1, 0);
    let child = |n: u8, on_parent_failure: ParentFailure| JobEnvelope {
        id: JobId::from_bytes([n; 16]),
        kind: "vault.put".into(),
        sequence: None,
        payload: json!({"record": {"n": n}}),
        after: vec![parent.id.clone()],
        on_parent_failure,
        ..ledger_job(n, 1, 0)
    };
    // The parent is not stored yet (still in its queue): the child waits, and again on a
    // redelivery, held once.
    assert_eq!(
        states(&deliver(&store, child(41, ParentFailure::Cancel)).await),
        [JobState::WaitingForParents]
    );
    assert_eq!(
        states(&deliver(&store, child(41, ParentFailure::Cancel)).await),
        [JobState::WaitingForParents]
    );
    let held = store.read(|tx| tx.scheduled_count()).await.unwrap();
    assert_eq!(held, 1, "its message is held once");
    // The parent failed: the child ends cancelled, unrun; one that asked to run anyway runs.
    let failed = super::stored(&parent, JobState::Failed, None, Some("no".into()), None);
    store.transact(move |tx| tx.record_job(&failed)).await.unwrap();
    let cancelled = deliver(&store, child(41, ParentFailure::Cancel)).await;
    assert_eq!(states(&cancelled), [JobState::Cancelled]);
    assert_eq!(cancelled[0].status.reason.as_deref(), Some(super::PARENT_FAILED));
    assert_eq!(store.read(|tx| tx.scheduled_count()).await.unwrap(), 0, "no longer held");
    assert_eq!(states(&deliver(&store, child(42, ParentFailure::Run)).await), [JobState::Succeeded]);
}

#[tokio::test]
async fn jobs_waiting_for_parents_count_against_the_clients_cap_of_held_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let catalog = catalog();
    let session = &keys().session;
    let child = |n: u8| JobEnvelope {
        id: JobId::from_bytes([n; 16]),
        kind: "vault.put".into(),
        sequence: None,
        payload: json!({"record": {}}),
        after: vec![JobId::from_bytes([50; 16])],
        ..ledger_job(n, 1, 0)
    };
    let mut verdicts = Vec::new();
    for n in [51, 52] {
        let env = child(n);
        let raw = Vouched::wrap(session, &serde_json::to_vec(&env.seal(session).unwrap()).unwrap()).unwrap();
        let catalog = catalog.clone();
        let verdict = store
            .transact(move |tx| -> Result<_, ApplyError> {
                let spec = catalog.kind(&env.kind).unwrap().clone();
                let caps = ClientCaps { delayed: 1, ..ClientCaps::default() };
                let arrival = Arrival {
                    env: env.clone(),
                    raw: raw.clone(),
                    target: ReplyTarget::default(),
                    replay: None,
                    caps,
                    turn_lease: None,
                };
                decide_and_run(tx, &catalog, &kinds(&catalog), &spec, &keys().sessions, &arrival)
            })
            .await
            .unwrap();
        verdicts.push(verdict);
    }
    assert!(matches!(&verdicts[0], Verdict::Answered(a) if states(a) == [JobState::WaitingForParents]));
    assert!(
        matches!(&verdicts[1], Verdict::DeadLetter(d) if d.reason == DeadReason::DelayedLimit && d.record),
        "{:?}",
        verdicts[1]
    );
}
