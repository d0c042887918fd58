//! The transaction's own tests (commits, rollbacks, migrations, the files' privacy) and the
//! helpers the tests beside each table's operations share (SQLite).
use super::*;
use crate::Store;

/// The same data key every time, so that a reopened store can read what it wrote.
pub(super) fn test_keyring() -> Keyring {
    Keyring::parse(&format!("k1 {}", "ab".repeat(32))).unwrap()
}

pub(super) fn id(n: u8) -> JobId {
    JobId::from_bytes([n; 16])
}

/// A handler family of the tests' own: notes, sealed, for their owner.
pub(super) const NOTES: crate::Family = crate::Family {
    name: "notes",
    migrations: &["CREATE TABLE notes (id TEXT PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL)"],
    sealed: &[crate::SealedColumn { table: "notes", key: "id", owner: "owner", column: "body" }],
};

pub(super) fn open(path: &std::path::Path) -> Store {
    Store::open_sqlite(path, test_keyring(), &[NOTES]).unwrap()
}

pub(super) fn note_at<'a>(id: &'a str, owner: &'a str) -> Place<'a> {
    Place { table: "notes", column: "body", row: id, owner }
}

pub(super) fn put_note(tx: &Tx<'_>, id: &str, owner: &str, body: &Value) -> Result<(), StorageError> {
    tx.execute(
        "INSERT INTO notes (id, owner, body) VALUES (?1, ?2, ?3)",
        params![id, owner, tx.seal(body, &note_at(id, owner))?],
    )?;
    Ok(())
}

pub(super) fn get_note(tx: &Tx<'_>, id: &str, owner: &str) -> Result<Option<Value>, StorageError> {
    let stored =
        tx.query_row("SELECT body FROM notes WHERE id = ?1 AND owner = ?2", params![id, owner], |r| {
            r.get(0)
        })?;
    tx.unseal(stored, &note_at(id, owner))
}

pub(super) fn job(n: u8, state: JobState, seq: Option<(&str, u64)>) -> StoredJob {
    StoredJob {
        id: id(n),
        client: "c".into(),
        kind: "ledger.apply".into(),
        state,
        result: None,
        error: None,
        reason: None,
        sequence: seq.map(|(k, n)| (k.to_owned(), n)),
        submitted_at_ms: None,
    }
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
pub(super) fn tamper(path: &std::path::Path, sql: &str) {
    rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap();
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
async fn reads_see_what_was_committed_and_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db.sqlite"));
    assert_eq!(store.read(|tx| tx.next_expected("k")).await.unwrap(), 1);
    store.transact(|tx| tx.set_next_expected("k", 7)).await.unwrap();
    assert_eq!(store.read(|tx| tx.next_expected("k")).await.unwrap(), 7);
    // The read connection is read-only: a write in a read fails, and is not kept.
    let wrote = store.read(|tx| tx.set_next_expected("k", 9)).await;
    assert!(matches!(&wrote, Err(e) if e.refusal() == Some("read-only database")), "{wrote:?}");
    assert_eq!(store.transact(|tx| tx.next_expected("k")).await.unwrap(), 7);
    // And a probe write is a write like any other.
    store.transact(|tx| tx.probe_write()).await.unwrap();
}

#[test]
fn a_refusal_is_told_from_an_error_of_one_transaction() {
    use rusqlite::ffi;
    let sqlite = |code| StorageError::Sqlite(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None));
    let pg =
        |code: Option<&str>| StorageError::Postgres { code: code.map(str::to_owned), message: "m".into() };
    assert_eq!(sqlite(ffi::SQLITE_FULL).refusal(), Some("disk full"));
    assert_eq!(sqlite(ffi::SQLITE_READONLY).refusal(), Some("read-only database"));
    assert_eq!(sqlite(ffi::SQLITE_IOERR).refusal(), Some("disk I/O error"));
    assert_eq!(sqlite(ffi::SQLITE_BUSY).refusal(), None, "busy: another writer, not a refusal");
    assert_eq!(sqlite(ffi::SQLITE_CONSTRAINT).refusal(), None);
    assert_eq!(pg(Some("53100")).refusal(), Some("PostgreSQL: disk full"));
    assert_eq!(pg(Some("25006")).refusal(), Some("PostgreSQL: read-only transaction"));
    assert_eq!(pg(None).refusal(), Some("no connection to PostgreSQL"));
    assert_eq!(pg(Some("08006")).refusal(), Some("PostgreSQL: connection lost"));
    assert_eq!(pg(Some("40P01")).refusal(), None, "a deadlock is one transaction's");
    assert_eq!(pg(Some("23505")).refusal(), None);
    let commit =
        StorageError::Commit { message: "database or disk is full".into(), refusal: Some("disk full") };
    assert_eq!(commit.refusal(), Some("disk full"));
}
