//! Unit tests of the storage transaction's operations (SQLite).
use super::*;
use crate::Store;

/// The same data key every time, so that a reopened store can read what it wrote.
fn test_keyring() -> Keyring {
    Keyring::parse(&format!("k1 {}", "ab".repeat(32))).unwrap()
}

fn id(n: u8) -> JobId {
    JobId::from_bytes([n; 16])
}

/// A handler family of the tests' own: notes, sealed, for their owner.
const NOTES: crate::Family = crate::Family {
    name: "notes",
    migrations: &["CREATE TABLE notes (id TEXT PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL)"],
    sealed: &[crate::SealedColumn { table: "notes", key: "id", owner: "owner", column: "body" }],
};

fn open(path: &std::path::Path) -> Store {
    Store::open_sqlite(path, test_keyring(), &[NOTES]).unwrap()
}

fn note_at<'a>(id: &'a str, owner: &'a str) -> Place<'a> {
    Place { table: "notes", column: "body", row: id, owner }
}

fn put_note(tx: &Tx<'_>, id: &str, owner: &str, body: &Value) -> Result<(), StorageError> {
    tx.execute(
        "INSERT INTO notes (id, owner, body) VALUES (?1, ?2, ?3)",
        params![id, owner, tx.seal(body, &note_at(id, owner))?],
    )?;
    Ok(())
}

fn get_note(tx: &Tx<'_>, id: &str, owner: &str) -> Result<Option<Value>, StorageError> {
    let stored =
        tx.query_row("SELECT body FROM notes WHERE id = ?1 AND owner = ?2", params![id, owner], |r| {
            r.get(0)
        })?;
    tx.unseal(stored, &note_at(id, owner))
}

fn job(n: u8, state: JobState, seq: Option<(&str, u64)>) -> StoredJob {
    StoredJob {
        id: id(n),
        client: "c".into(),
        kind: "ledger.apply".into(),
        state,
        result: None,
        error: None,
        reason: None,
        sequence: seq.map(|(k, n)| (k.to_owned(), n)),
    }
}

#[tokio::test]
async fn a_sequence_number_belongs_to_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
    store.transact(|tx| tx.record_job(&job(1, JobState::Succeeded, Some(("k", 1))))).await.unwrap();
    let err =
        store.transact(|tx| tx.record_job(&job(2, JobState::Succeeded, Some(("k", 1))))).await.unwrap_err();
    assert!(err.to_string().contains("UNIQUE"), "{err}");
    let holder = store.transact(|tx| tx.sequence_holder("k", 1)).await.unwrap();
    assert_eq!(holder, Some(id(1)));
}

#[test]
fn workers_that_start_together_on_a_new_database_migrate_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let opened: Vec<Result<Store, StorageError>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..6).map(|_| s.spawn(|| Store::open_sqlite(&path, test_keyring(), &[NOTES]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in &opened {
        assert!(o.is_ok(), "{:?}", o.as_ref().err());
    }
}

#[tokio::test]
async fn failed_closure_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
    let r: Result<(), _> = store
        .transact(|tx| {
            tx.set_next_expected("k", 5)?;
            Err(StorageError::Corrupt("boom".into()))
        })
        .await;
    assert!(r.is_err());
    assert_eq!(store.transact(|tx| tx.next_expected("k")).await.unwrap(), 1);
}

#[tokio::test]
async fn a_family_migrates_once_and_its_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    {
        let store = open(&path);
        store.transact(|tx| put_note(tx, "n1", "alice", &serde_json::json!({"t": "hi"}))).await.unwrap();
    }
    // Opened again: the step does not run twice (it would fail: the table exists).
    let store = open(&path);
    let got = store.transact(|tx| get_note(tx, "n1", "alice")).await.unwrap();
    assert_eq!(got, Some(serde_json::json!({"t": "hi"})));
    assert_eq!(store.transact(|tx| get_note(tx, "n1", "mallory")).await.unwrap(), None);
    drop(store);
    // A release with a second step runs just that one.
    const NOTES_2: crate::Family = crate::Family {
        migrations: &[NOTES.migrations[0], "ALTER TABLE notes ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"],
        ..NOTES
    };
    let store = Store::open_sqlite(&path, test_keyring(), &[NOTES_2]).unwrap();
    let pinned = store
        .transact(|tx| {
            tx.query_row("SELECT pinned FROM notes WHERE id = 'n1'", params![], |r| r.get::<i64>(0))
        })
        .await
        .unwrap();
    assert_eq!(pinned, Some(0));
    drop(store);
    // A database a newer release of the family wrote is refused, not guessed at.
    let older = Store::open_sqlite(&path, test_keyring(), &[NOTES]);
    assert!(older.is_err_and(|e| e.to_string().contains("newer")));
    // Two families of one name are refused.
    assert!(Store::open_sqlite(&path, test_keyring(), &[NOTES_2, NOTES_2]).is_err());
}

/// Runs `sql` on the database file behind the worker's back (an attacker with file access).
fn tamper(path: &std::path::Path, sql: &str) {
    rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap();
}

#[tokio::test]
async fn sealed_values_are_bound_to_their_owner_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = open(&path);
    store.transact(|tx| put_note(tx, "n1", "alice", &serde_json::json!({"name": "Ada"}))).await.unwrap();
    store
        .transact(|tx| {
            tx.record_job(&StoredJob {
                result: Some(serde_json::json!({"n": 1})),
                ..job(4, JobState::Succeeded, None)
            })
        })
        .await
        .unwrap();
    // Moved to mallory by editing the owner column: it does not open for her.
    tamper(&path, "UPDATE notes SET owner = 'mallory' WHERE id = 'n1'");
    let got = store.transact(|tx| get_note(tx, "n1", "mallory")).await;
    assert!(matches!(got, Err(StorageError::Crypto(_))), "{got:?}");
    // Moved to another row: nor there.
    tamper(&path, "UPDATE notes SET owner = 'alice', id = 'n2' WHERE id = 'n1'");
    let got = store.transact(|tx| get_note(tx, "n2", "alice")).await;
    assert!(matches!(got, Err(StorageError::Crypto(_))), "{got:?}");
    // Downgraded to plaintext: refused, not read.
    tamper(&path, "UPDATE notes SET id = 'n1', body = '{\"name\":\"Eve\"}'");
    let got = store.transact(|tx| get_note(tx, "n1", "alice")).await;
    assert!(matches!(got, Err(StorageError::Crypto(_))), "{got:?}");
    // A job's result given to another client does not open either.
    tamper(&path, "UPDATE jobs SET client = 'mallory'");
    assert!(matches!(store.transact(|tx| tx.job(&id(4))).await, Err(StorageError::Crypto(_))));
}

#[cfg(unix)]
#[tokio::test]
async fn the_database_and_its_log_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = open(&path);
    store.transact(|tx| tx.set_next_expected("k", 2)).await.unwrap();
    for f in ["db.sqlite", "db.sqlite-wal", "db.sqlite-shm"] {
        let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}

#[tokio::test]
async fn values_of_earlier_releases_are_resealed_once_by_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    // As release 7 left it: a v1 record bound to its token only, a plaintext result, a
    // plaintext ledger row (the vault and the ledger were tables of this schema then).
    {
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        crate::migrations::upgrade(&mut conn, &test_keyring(), 0, 7).unwrap();
    }
    let v1 = test_keyring().encrypt(br#"{"name":"Ada"}"#, b"tok_1").unwrap().replacen("v2.", "v1.", 1);
    tamper(&path, &format!(
        "INSERT INTO vault VALUES ('tok_1', 'alice', '{v1}', 0);
         INSERT INTO jobs (id, client, kind, state, result, updated_at_ms) VALUES ('{}', 'alice', 'k', 'succeeded', '{{\"n\":1}}', 0);
         INSERT INTO ledger VALUES ('alice\u{1f}acct', 42, 3);",
        id(9).as_str()
    ));
    let store = open(&path);
    let read = |table: &'static str,
                column: &'static str,
                key: &'static str,
                row: &'static str,
                owner: &'static str| {
        let store = store.clone();
        async move {
            store
                .transact(move |tx| {
                    let stored = tx.query_row(
                        &format!("SELECT {column} FROM {table} WHERE {key} = ?1"),
                        params![row],
                        |r| r.get(0),
                    )?;
                    tx.unseal(stored, &Place { table, column, row, owner })
                })
                .await
        }
    };
    assert_eq!(
        read("vault", "record", "token", "tok_1", "alice").await.unwrap(),
        Some(serde_json::json!({"name": "Ada"}))
    );
    let job = store.transact(|tx| tx.job(&id(9))).await.unwrap().unwrap();
    assert_eq!(job.result, Some(serde_json::json!({"n": 1})));
    assert_eq!(
        read("ledger", "state", "account", "alice\u{1f}acct", "").await.unwrap(),
        Some(serde_json::json!({"balance": 42, "sequence": 3}))
    );
    drop(store);
    // Once only: a plaintext value written afterwards stays refused across restarts.
    tamper(&path, "UPDATE vault SET record = '{\"name\":\"Eve\"}'");
    let store = open(&path);
    let store2 = store.clone();
    let got = store2
        .transact(|tx| {
            let stored =
                tx.query_row("SELECT record FROM vault WHERE token = 'tok_1'", params![], |r| r.get(0))?;
            tx.unseal(stored, &Place { table: "vault", column: "record", row: "tok_1", owner: "alice" })
        })
        .await;
    assert!(got.is_err());
    drop(store);
}

#[tokio::test]
async fn parked_jobs_come_back_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
    store
        .transact(|tx| {
            tx.record_job(&job(3, JobState::WaitingForSequence, Some(("k", 2))))?;
            tx.park(&Parked {
                job_id: id(3),
                seq_key: "k".into(),
                seq_number: 2,
                envelope: b"{}".to_vec(),
                reply_to: None,
                correlation_id: Some("c".into()),
                deadline_ms: 0,
            })
        })
        .await
        .unwrap();
    let first = store.transact(|tx| tx.take_parked("k", 2)).await.unwrap();
    assert_eq!(first.unwrap().job_id, id(3));
    assert_eq!(store.transact(|tx| tx.take_parked("k", 2)).await.unwrap(), None);
}

#[tokio::test]
async fn a_replay_forgets_a_dead_lettered_job_only_for_its_latest_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
    let dead = || async {
        store
            .transact(|tx| {
                let n = tx.count_dead_letter(&id(9))?;
                tx.record_job(&job(9, JobState::DeadLettered, None))?;
                Ok::<_, StorageError>(n)
            })
            .await
            .unwrap()
    };
    assert_eq!(dead().await, 1);
    // Dead-lettered again before the grant for the first came back: whatever the clocks say
    // (a grant issued "later" by a clock ahead), the grant is for dead letter 1, not 2.
    assert_eq!(dead().await, 2);
    let forget = |n| store.transact(move |tx| tx.forget_dead_lettered(&id(9), n));
    assert_eq!(forget(1).await.unwrap(), Forget::GrantTooOld);
    assert_eq!(forget(2).await.unwrap(), Forget::Forgotten);
    assert_eq!(forget(2).await.unwrap(), Forget::NotDeadLettered, "the job runs afresh");
    // The count outlives the forgotten record: a third dead letter is 3, and grant 2 is old.
    assert_eq!(dead().await, 3);
    assert_eq!(forget(2).await.unwrap(), Forget::GrantTooOld);
}

#[tokio::test]
async fn attempts_count_up_and_remember_the_last_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
    let n = store.transact(|tx| tx.begin_attempt(&id(4), "c")).await.unwrap();
    assert_eq!(n, 1);
    store.transact(|tx| tx.fail_attempt(&id(4), "boom")).await.unwrap();
    let n = store.transact(|tx| tx.begin_attempt(&id(4), "c")).await.unwrap();
    assert_eq!(n, 2);
    let a = store.transact(|tx| tx.attempts(&id(4))).await.unwrap().unwrap();
    assert_eq!((a.count, a.last_error.as_deref(), a.running), (2, Some("boom"), true));
    // Started again without finishing or failing: the previous start is still marked running
    // (interrupted).
    let before = store.transact(|tx| tx.attempts(&id(4))).await.unwrap().unwrap();
    assert!(before.running);
    let n = store.transact(|tx| tx.begin_attempt(&id(4), "c")).await.unwrap();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn a_panicking_transaction_rolls_back_and_the_store_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
    let r: Result<(), StorageError> = store
        .transact(|tx| {
            tx.set_next_expected("k", 9)?;
            panic!("handler bug")
        })
        .await;
    assert!(matches!(r, Err(StorageError::Panicked(ref m)) if m == "handler bug"), "{r:?}");
    assert_eq!(store.transact(|tx| tx.next_expected("k")).await.unwrap(), 1);
}

#[tokio::test]
async fn records_and_results_are_encrypted_at_rest_and_rekeyed_with_every_family_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = open(&path);
    store
        .transact(|tx| put_note(tx, "n1", "alice", &serde_json::json!({"secret": "MARKER-4711"})))
        .await
        .unwrap();
    let mut done = job(5, JobState::Succeeded, None);
    done.result = Some(serde_json::json!({"echo": "MARKER-4711"}));
    store.transact(move |tx| tx.record_job(&done)).await.unwrap();
    drop(store);
    let raw = |p: &std::path::Path| {
        let mut bytes = std::fs::read(p).unwrap_or_default();
        bytes.extend(std::fs::read(p.with_extension("sqlite-wal")).unwrap_or_default());
        String::from_utf8_lossy(&bytes).contains("MARKER-4711")
    };
    assert!(!raw(&path), "plaintext on disk");

    // Rotate: k2 becomes active; old rows stay readable, and rekey moves them to k2 — the
    // family's column too, though this store (like `gatehouse rekey`) was opened without
    // the family: its sealed columns are recorded in the database.
    let rotated = || Keyring::parse(&format!("k1 {}\nk2 {}", "ab".repeat(32), "cd".repeat(32))).unwrap();
    let store = Store::open_sqlite(&path, rotated(), &[]).unwrap();
    let got = store.transact(|tx| get_note(tx, "n1", "alice")).await.unwrap();
    assert_eq!(got.unwrap()["secret"], "MARKER-4711");
    assert_eq!(store.transact(|tx| tx.rekey()).await.unwrap(), 2);
    assert_eq!(store.transact(|tx| tx.rekey()).await.unwrap(), 0);
    drop(store);
    let only_k2 = Keyring::parse(&format!("k2 {}", "cd".repeat(32))).unwrap();
    let store = Store::open_sqlite(&path, only_k2, &[NOTES]).unwrap();
    let got = store.transact(move |tx| tx.job(&id(5))).await.unwrap().unwrap();
    assert_eq!(got.result.unwrap()["echo"], "MARKER-4711");
    let got = store.transact(|tx| get_note(tx, "n1", "alice")).await.unwrap();
    assert_eq!(got.unwrap()["secret"], "MARKER-4711");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closures_that_arrive_together_commit_together_and_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .transact(move |tx| {
                        tx.set_next_expected(&format!("k{i}"), 5)?;
                        if i % 10 == 0 { Err(StorageError::Corrupt("no".into())) } else { Ok(()) }
                    })
                    .await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().is_ok(), i % 10 != 0);
    }
    for i in 0..200 {
        let next = store.transact(move |tx| tx.next_expected(&format!("k{i}"))).await.unwrap();
        assert_eq!(next, if i % 10 == 0 { 1 } else { 5 }, "key {i}");
    }
}

#[tokio::test]
async fn pruning_deletes_only_decided_jobs_of_the_kind_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
    let of = |n: u8, kind: &str, state: JobState| StoredJob { kind: kind.into(), ..job(n, state, None) };
    let rows = [
        of(1, "a", JobState::Succeeded),
        of(2, "a", JobState::Failed),
        of(3, "a", JobState::DeadLettered),
        of(4, "a", JobState::WaitingForSequence),
        of(5, "b", JobState::Succeeded),
    ];
    store.transact(move |tx| rows.iter().try_for_each(|j| tx.record_job(j))).await.unwrap();
    let kinds = store.transact(|tx| tx.decided_kinds()).await.unwrap();
    assert_eq!(kinds, ["a", "b"]);

    // Nothing was decided before the cut-off yet.
    let then = now_ms() - 60_000;
    assert_eq!(store.transact(move |tx| tx.prune_decided("a", then, 10)).await.unwrap(), 0);

    let soon = now_ms() + 1;
    assert_eq!(store.transact(move |tx| tx.prune_decided("a", soon, 2)).await.unwrap(), 2);
    assert_eq!(store.transact(move |tx| tx.prune_decided("a", soon, 2)).await.unwrap(), 1);
    assert_eq!(store.transact(move |tx| tx.prune_decided("a", soon, 2)).await.unwrap(), 0);
    for (n, kept) in [(1, false), (2, false), (3, false), (4, true), (5, true)] {
        let found = store.transact(move |tx| tx.job(&id(n))).await.unwrap();
        assert_eq!(found.is_some(), kept, "job {n}");
    }
    assert_eq!(store.transact(|tx| tx.decided_kinds()).await.unwrap(), ["b"]);
}
