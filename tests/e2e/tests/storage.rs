//! The storage's behaviour on both backends: every scenario runs on an SQLite file and on a
//! PostgreSQL database (the tests' private server), through the same `Store` and `Tx` the
//! worker uses. Where several workers share PostgreSQL, several stores (each its own pool, as
//! each worker process has) act at once.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_e2e::{admin_connection, fresh_database};
use gatehouse_protocol::crypto::Keyring;
use gatehouse_protocol::{JobId, JobState};
use gatehouse_storage::sql::params;
use gatehouse_storage::{Family, Location, Place, SealedColumn, StorageError, Store, StoredJob, Tx};
use serde_json::{Value, json};
use tempfile::TempDir;

fn keyring() -> Keyring {
    Keyring::parse(&format!("k1 {}", "ab".repeat(32))).unwrap()
}

/// A handler family of the tests' own, written once for both backends: notes, sealed.
const NOTES: Family = Family {
    name: "notes",
    migrations: &[
        "CREATE TABLE notes (id TEXT PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL)",
        "ALTER TABLE notes ADD COLUMN edits INTEGER NOT NULL DEFAULT 0",
    ],
    sealed: &[SealedColumn { table: "notes", key: "id", owner: "owner", column: "body" }],
};

/// A database on one backend; `open` gives another store on it (another worker's).
struct Db {
    location: Location,
    /// PostgreSQL's url and password, to look at the rows directly.
    pg: Option<(String, String)>,
    _dir: Option<TempDir>,
}

impl Db {
    async fn sqlite() -> Self {
        let dir = TempDir::new().unwrap();
        Self { location: Location::Sqlite(dir.path().join("db.sqlite")), pg: None, _dir: Some(dir) }
    }

    async fn postgres() -> Self {
        let (url, password) = fresh_database().await;
        let location = Location::parse(&url, Some(password.clone()), 8).unwrap();
        Self { location, pg: Some((url, password)), _dir: None }
    }

    async fn both() -> [Self; 2] {
        [Self::sqlite().await, Self::postgres().await]
    }

    async fn open(&self) -> Store {
        Store::open(&self.location, keyring(), &[NOTES]).await.unwrap()
    }

    fn name(&self) -> &'static str {
        if self.pg.is_some() { "postgres" } else { "sqlite" }
    }

    /// One text column of one row, as stored (no decryption).
    async fn raw(&self, sql: &'static str) -> Option<String> {
        match &self.pg {
            Some((url, password)) => {
                let c = admin_connection(url, password).await;
                c.query_opt(sql, &[]).await.unwrap().map(|r| r.get(0))
            }
            None => {
                let Location::Sqlite(path) = &self.location else { unreachable!() };
                let c = gatehouse_e2e_sqlite(path);
                c.query_row(sql, [], |r| r.get(0)).ok()
            }
        }
    }
}

fn gatehouse_e2e_sqlite(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

fn id(n: u32) -> JobId {
    let mut b = [7u8; 16];
    b[..4].copy_from_slice(&n.to_be_bytes());
    JobId::from_bytes(b)
}

fn job(n: u32, state: JobState, seq: Option<(&str, u64)>) -> StoredJob {
    StoredJob {
        id: id(n),
        client: "c".into(),
        kind: "ledger.apply".into(),
        state,
        result: Some(json!({"n": n, "secret": "plain-marker"})),
        error: None,
        reason: None,
        sequence: seq.map(|(k, n)| (k.to_owned(), n)),
        submitted_at_ms: None,
    }
}

fn note_at<'a>(id: &'a str, owner: &'a str) -> Place<'a> {
    Place { table: "notes", column: "body", row: id, owner }
}

fn put_note(tx: &Tx<'_>, id: &str, owner: &str, body: &Value) -> Result<usize, StorageError> {
    tx.execute(
        "INSERT INTO notes (id, owner, body) VALUES (?1, ?2, ?3)",
        params![id, owner, tx.seal(body, &note_at(id, owner))?],
    )
}

#[tokio::test]
async fn outcomes_are_kept_sealed_and_read_back_on_both_backends() {
    for db in Db::both().await {
        let store = db.open().await;
        store.transact(|tx| tx.record_job(&job(1, JobState::Succeeded, Some(("k", 1))))).await.unwrap();
        let back = store.transact(|tx| tx.job(&id(1))).await.unwrap().unwrap();
        assert_eq!(back, job(1, JobState::Succeeded, Some(("k", 1))), "{}", db.name());
        let raw = db.raw("SELECT result FROM jobs").await.unwrap();
        assert!(!raw.contains("plain-marker"), "{}: a result is stored in the clear: {raw}", db.name());
        // A family's table, migrated by both of its steps, and its sealed column.
        store
            .transact(|tx| {
                put_note(tx, "n1", "alice", &json!({"text": "plain-marker"}))?;
                // INTEGER is 64 bits on both backends (a time in ms does not fit in 32).
                tx.execute("UPDATE notes SET edits = edits + ?1 WHERE id = ?2", params![1_i64 << 40, "n1"])
            })
            .await
            .unwrap();
        let (body, edits) = store
            .transact(|tx| {
                let row =
                    tx.query_row("SELECT body, edits FROM notes WHERE id = ?1", params!["n1"], |r| {
                        Ok((r.get::<String>(0)?, r.get::<i64>(1)?))
                    })?;
                let (stored, edits) = row.unwrap();
                Ok::<_, StorageError>((tx.unseal(Some(stored), &note_at("n1", "alice"))?, edits))
            })
            .await
            .unwrap();
        assert_eq!(body, Some(json!({"text": "plain-marker"})), "{}", db.name());
        assert_eq!(edits, 1 << 40, "{}", db.name());
        // Bound to its owner: read as another's, it does not open.
        let moved = store
            .transact(|tx| {
                let stored = tx.query_row("SELECT body FROM notes", params![], |r| r.get::<String>(0))?;
                tx.unseal(stored, &note_at("n1", "mallory"))
            })
            .await;
        assert!(matches!(moved, Err(StorageError::Crypto(_))), "{}: {moved:?}", db.name());
        // Rekey goes over the family's column too.
        assert!(store.transact(|tx| tx.rekey()).await.unwrap() == 0, "{}", db.name());
    }
}

#[tokio::test]
async fn a_sequence_number_belongs_to_one_job_and_a_failed_closure_keeps_nothing() {
    for db in Db::both().await {
        let store = db.open().await;
        store.transact(|tx| tx.record_job(&job(1, JobState::Succeeded, Some(("k", 1))))).await.unwrap();
        let taken = store.transact(|tx| tx.record_job(&job(2, JobState::Succeeded, Some(("k", 1))))).await;
        assert!(taken.is_err(), "{}: a second job took number 1", db.name());
        assert_eq!(store.transact(|tx| tx.sequence_holder("k", 1)).await.unwrap(), Some(id(1)));
        // A closure that wrote and then failed leaves nothing; the store goes on.
        let failed = store
            .transact(|tx| {
                tx.record_job(&job(3, JobState::Succeeded, None))?;
                Err::<(), _>(StorageError::Corrupt("changed my mind".into()))
            })
            .await;
        assert!(failed.is_err());
        let panicked = store
            .transact(|tx| -> Result<(), StorageError> {
                tx.record_job(&job(4, JobState::Succeeded, None))?;
                panic!("handler bug")
            })
            .await;
        assert!(matches!(panicked, Err(StorageError::Panicked(_))), "{}: {panicked:?}", db.name());
        for n in [3, 4] {
            assert_eq!(store.transact(move |tx| tx.job(&id(n))).await.unwrap(), None, "{}", db.name());
        }
        store.transact(|tx| tx.record_job(&job(5, JobState::Succeeded, None))).await.unwrap();
    }
}

#[tokio::test]
async fn attempts_are_counted_across_workers() {
    for db in Db::both().await {
        let stores = [db.open().await, db.open().await, db.open().await];
        let mut tasks = Vec::new();
        for i in 0..60 {
            let store = stores[i % 3].clone();
            tasks.push(tokio::spawn(async move { store.transact(|tx| tx.begin_attempt(&id(9), "c")).await }));
        }
        let mut counts = Vec::new();
        for t in tasks {
            counts.push(t.await.unwrap().unwrap());
        }
        counts.sort_unstable();
        // Each start got its own number: none counted twice, none lost.
        assert_eq!(counts, (1..=60).collect::<Vec<u32>>(), "{}", db.name());
    }
}

/// What the lock is for: a read-modify-write that several workers do at once. With the lock
/// no update is lost; the control run without it shows the test can see lost updates.
#[tokio::test]
async fn the_lock_serializes_workers_on_postgres() {
    async fn increments(db: &Db, lock: bool) -> i64 {
        let stores: Vec<Store> = futures_util::future::join_all((0..3).map(|_| db.open())).await;
        stores[0].transact(|tx| put_note(tx, "counter", "c", &json!(0))).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..30 {
            let store = stores[i % 3].clone();
            tasks.push(tokio::spawn(async move {
                store
                    .transact(move |tx| {
                        if lock {
                            tx.lock("counter")?;
                        }
                        let n = tx
                            .query_row("SELECT edits FROM notes WHERE id = ?1", params!["counter"], |r| {
                                r.get::<i64>(0)
                            })?
                            .unwrap();
                        std::thread::sleep(Duration::from_millis(5));
                        tx.execute("UPDATE notes SET edits = ?1 WHERE id = ?2", params![n + 1, "counter"])
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        stores[0]
            .transact(|tx| {
                tx.query_row("SELECT edits FROM notes WHERE id = ?1", params!["counter"], |r| r.get(0))
            })
            .await
            .unwrap()
            .unwrap()
    }
    assert_eq!(increments(&Db::postgres().await, true).await, 30);
    let unlocked = increments(&Db::postgres().await, false).await;
    assert!(unlocked < 30, "without the lock no update was lost ({unlocked}): the test shows nothing");
    assert_eq!(increments(&Db::sqlite().await, true).await, 30);
}

/// Counts the closures of each commit (see [`gatehouse_storage::StorageObserver`]).
#[derive(Default)]
struct Commits {
    shared: std::sync::atomic::AtomicUsize,
    largest: std::sync::atomic::AtomicUsize,
}

impl gatehouse_storage::StorageObserver for Commits {
    fn committed(&self, _took: Duration, closures: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        if closures > 1 {
            self.shared.fetch_add(1, Relaxed);
        }
        self.largest.fetch_max(closures, Relaxed);
    }

    fn checkpointed(&self, _took: Duration, _rewind: bool) {}
}

/// 300 closures at once, every 7th failing and every 11th panicking after its write, every 13th
/// with a write the database refuses (sent later on PostgreSQL, perhaps with COMMIT): each
/// caller hears its own outcome, and exactly the writes of those that succeeded are kept, while
/// commits are shared (on PostgreSQL a failure undoes the batch, which then runs again with a
/// savepoint per closure).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_shared_commit_a_failing_closure_undoes_only_itself_on_both_backends() {
    for db in Db::both().await {
        let store = db.open().await;
        let commits = Arc::new(Commits::default());
        store.observe(commits.clone());
        store.transact(|tx| put_note(tx, "taken", "c", &json!("first"))).await.unwrap();
        let tasks: Vec<_> = (0..300)
            .map(|i: i64| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .transact(move |tx| {
                            put_note(tx, &format!("n{i}"), "c", &json!(i))?;
                            if i % 13 == 8 && i % 7 != 3 && i % 11 != 5 {
                                // Refused, on PostgreSQL only when sent (with a later statement
                                // or with COMMIT): a note with this id exists.
                                tx.write(
                                    "INSERT INTO notes (id, owner, body) VALUES (?1, ?2, ?3)",
                                    params!["taken", "c", "x"],
                                )?;
                            }
                            if i % 7 == 3 {
                                return Err(StorageError::Corrupt(format!("refused {i}")));
                            }
                            assert!(i % 11 != 5, "closure {i} panics");
                            Ok(i)
                        })
                        .await
                })
            })
            .collect();
        let mut kept = vec!["taken".to_owned()];
        for (i, t) in tasks.into_iter().enumerate() {
            let i = i as i64;
            let refused = i % 13 == 8 && i % 7 != 3 && i % 11 != 5;
            match t.await.unwrap() {
                Ok(n) => {
                    assert_eq!(n, i);
                    assert!(i % 7 != 3 && i % 11 != 5 && !refused, "{}: closure {i} succeeded", db.name());
                    kept.push(format!("n{i}"));
                }
                Err(e) if refused => {
                    assert!(e.to_string().contains("duplicate") || e.to_string().contains("UNIQUE"), "{e}")
                }
                Err(StorageError::Corrupt(m)) => assert_eq!((i % 7, m), (3, format!("refused {i}"))),
                Err(StorageError::Panicked(m)) => assert!(i % 11 == 5 && m.contains("panics"), "{m}"),
                Err(e) => panic!("{}: closure {i}: {e}", db.name()),
            }
        }
        let mut stored: Vec<String> = store
            .transact(|tx| tx.query("SELECT id FROM notes", params![])?.iter().map(|r| r.get(0)).collect())
            .await
            .unwrap();
        stored.sort();
        kept.sort();
        assert_eq!(stored, kept, "{}: the kept writes are exactly the successful closures'", db.name());
        let shared = commits.shared.load(std::sync::atomic::Ordering::Relaxed);
        assert!(shared > 0, "{}: no commit held more than one closure", db.name());
    }
}

/// Two workers' batches on the same 20 sequence keys: 1,200 closures, each taking one key's
/// lock and bumping its counter (read, then write: an update lost to a lock not held would
/// show). Commits are shared, no update is lost, no transaction waits 2 s, and PostgreSQL saw
/// no deadlock. (With the batches waiting for their locks instead of trying them, this
/// deadlocks at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_batches_on_the_same_keys_share_commits_and_never_deadlock() {
    const KEYS: usize = 20;
    const N: usize = 1200;
    let db = Db::postgres().await;
    let stores: Vec<Store> = futures_util::future::join_all((0..2).map(|_| db.open())).await;
    let commits = Arc::new(Commits::default());
    for s in &stores {
        s.observe(commits.clone());
    }
    stores[0]
        .transact(|tx| (0..KEYS).try_for_each(|k| put_note(tx, &format!("k{k}"), "c", &json!(0)).map(drop)))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = stores[i % 2].clone();
            let key = format!("k{}", (i * 7) % KEYS);
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                store
                    .transact(move |tx| {
                        tx.lock_sequence(&key)?;
                        let n: i64 = tx
                            .query_row("SELECT edits FROM notes WHERE id = ?1", params![key], |r| r.get(0))?
                            .unwrap();
                        tx.execute("UPDATE notes SET edits = ?1 WHERE id = ?2", params![n + 1, key])
                    })
                    .await
                    .unwrap();
                started.elapsed()
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    let counts: Vec<i64> = stores[0]
        .transact(|tx| {
            tx.query("SELECT edits FROM notes ORDER BY id", params![])?
                .iter()
                .map(|r| r.get::<i64>(0))
                .collect()
        })
        .await
        .unwrap();
    use std::sync::atomic::Ordering::Relaxed;
    let (shared, largest) = (commits.shared.load(Relaxed), commits.largest.load(Relaxed));
    // The server's own count of deadlocks it broke, for this database (its statistics are
    // sent within a second or so of a transaction's end).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (url, password) = db.pg.as_ref().unwrap();
    let c = admin_connection(url, password).await;
    let deadlocks: i64 = c
        .query_one("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "{N} closures over {KEYS} keys from 2 stores: {shared} shared commits, largest {largest}, slowest {slowest:?}, deadlocks {deadlocks}"
    );
    assert_eq!(counts, vec![(N / KEYS) as i64; KEYS], "an update was lost");
    assert!(shared > 0, "no commit held more than one closure: nothing was batched");
    assert!(slowest < Duration::from_secs(2), "a transaction took {slowest:?}");
    assert_eq!(deadlocks, 0);
}

/// Keeps a store's writer busy for 300 ms, from when this returns: closures sent meanwhile
/// queue, to be taken together (one batch with one writer). Answers when it was done.
async fn hold_writer(store: &Store) -> tokio::task::JoinHandle<std::time::Instant> {
    let started = Arc::new(tokio::sync::Notify::new());
    let (s, signal) = (store.clone(), started.clone());
    let busy = tokio::spawn(async move {
        s.transact(move |_| {
            signal.notify_one();
            std::thread::sleep(Duration::from_millis(300));
            Ok::<_, StorageError>(())
        })
        .await
        .unwrap();
        std::time::Instant::now()
    });
    started.notified().await;
    busy
}

/// A batch whose closures only write: on PostgreSQL every write goes with COMMIT, and one the
/// database refuses fails the commit. That is the refusing closure's failure alone: the batch
/// runs again with a savepoint each, the others' writes are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_refused_at_commit_fails_only_its_closure_on_both_backends() {
    for mut db in Db::both().await {
        if let Location::Postgres(c) = &mut db.location {
            c.writers = 1;
        }
        let store = db.open().await;
        store.transact(|tx| put_note(tx, "taken", "c", &json!("first"))).await.unwrap();
        let busy = hold_writer(&store).await;
        let mut calls: Vec<_> = (0..5)
            .map(|i| {
                let store = store.clone();
                Box::pin(async move {
                    store
                        .transact(move |tx| {
                            let id = if i == 3 { "taken".to_owned() } else { format!("w{i}") };
                            let body = tx.seal(&json!(i), &note_at(&id, "c"))?;
                            tx.write(
                                "INSERT INTO notes (id, owner, body) VALUES (?1, ?2, ?3)",
                                params![id, "c", body],
                            )
                        })
                        .await
                })
            })
            .collect();
        for call in &mut calls {
            let _ = futures_util::poll!(call.as_mut());
        }
        let answers = futures_util::future::join_all(calls).await;
        busy.await.unwrap();
        for (i, answer) in answers.iter().enumerate() {
            match answer {
                Err(e) if i == 3 => {
                    assert!(e.to_string().contains("duplicate") || e.to_string().contains("UNIQUE"), "{e}")
                }
                Ok(()) if i != 3 => {}
                other => panic!("{}: closure {i}: {other:?}", db.name()),
            }
        }
        let mut ids: Vec<String> = store
            .transact(|tx| tx.query("SELECT id FROM notes", params![])?.iter().map(|r| r.get(0)).collect())
            .await
            .unwrap();
        ids.sort();
        assert_eq!(ids, ["taken", "w0", "w1", "w2", "w4"], "{}", db.name());
    }
}

/// A batch's read stage on PostgreSQL (`postgres::ahead`): the batch locks and probes every
/// job of its closures in one round trip before they run. A probe read ahead must never be
/// served once it may be stale. With one writer kept busy, 46 closures queue and share one
/// transaction: (1) a closure that cancels a job, then one that decides it: the second sees the
/// cancellation (another closure locked the job first: the probe read ahead is stale); (2) two
/// deliveries of one fresh job: the first applies it, the second finds it applied (a probe is
/// served once); (3) a job whose lock another worker holds while it records the job: its
/// delivery waits, alone, and finds the record (a probe taken without the lock is never
/// served), while the rest of the batch commits without waiting for it; (4) a closure that
/// writes its job's record before probing it sees its own write. On SQLite the same
/// closures give the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_probe_read_ahead_for_a_batch_is_never_served_stale_on_both_backends() {
    use gatehouse_storage::JobProbe;
    use std::time::Instant;
    /// A closure's job, what it decided (applied; cancelled seen) and when it was answered.
    type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = (u32, bool, bool, Instant)> + Send>>;
    let probe_of = |n: u32| JobProbe { id: id(n), pauses: [String::new(), String::new()] };
    /// Decides job `n` as a delivery does: applied (recorded) when nothing is stored of it.
    fn deliver(tx: &Tx<'_>, n: u32) -> Result<(bool, bool), StorageError> {
        tx.lock_job(&id(n))?;
        let probe = tx.probe_paused(&id(n), ["", ""])?;
        let apply = probe.is_fresh();
        if apply {
            tx.record_job(&job(n, JobState::Succeeded, None))?;
        }
        Ok((apply, probe.cancelled))
    }
    for mut db in Db::both().await {
        if let Location::Postgres(c) = &mut db.location {
            c.writers = 1;
        }
        let store = db.open().await;
        let commits = Arc::new(Commits::default());
        store.observe(commits.clone());
        // (3) Another worker holds job 900's lock and records it, committing when told to.
        let other = db.open().await;
        let (locked, mut is_locked) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (release, released_signal) = std::sync::mpsc::channel::<()>();
        let held = db.pg.is_some().then(|| {
            tokio::spawn(async move {
                other
                    .transact(move |tx| {
                        tx.lock_job(&id(900))?;
                        tx.probe(&id(900))?; // sent with the lock: held from here on
                        tx.record_job(&job(900, JobState::Succeeded, None))?;
                        let _ = locked.send(());
                        let _ = released_signal.recv_timeout(Duration::from_secs(60));
                        Ok::<_, StorageError>(())
                    })
                    .await
                    .unwrap();
            })
        });
        if held.is_some() {
            is_locked.recv().await.expect("the other worker took job 900's lock");
        }
        // The writer is busy for 300 ms: everything below queues for one batch.
        let busy = hold_writer(&store).await;
        let mut calls: Vec<Answer> = vec![Box::pin(async move { (0, false, false, busy.await.unwrap()) })];
        for n in 1..=10 {
            let (s1, s2) = (store.clone(), store.clone());
            calls.push(Box::pin(async move {
                s1.transact(move |tx| {
                    tx.lock_job(&id(n))?;
                    tx.mark_cancelled(&id(n), "c")
                })
                .await
                .unwrap();
                (n, false, true, Instant::now())
            }));
            calls.push(Box::pin(async move {
                let (applied, cancelled) =
                    s2.transact_on(probe_of(n), move |tx| deliver(tx, n)).await.unwrap();
                (n, applied, cancelled, Instant::now())
            }));
        }
        for n in 101..=110 {
            for _ in 0..2 {
                let s = store.clone();
                calls.push(Box::pin(async move {
                    let (applied, cancelled) =
                        s.transact_on(probe_of(n), move |tx| deliver(tx, n)).await.unwrap();
                    (n, applied, cancelled, Instant::now())
                }));
            }
        }
        // (4) A closure that writes its job's record before probing it sees its own write.
        for n in 201..=205 {
            let s = store.clone();
            calls.push(Box::pin(async move {
                let own = s
                    .transact_on(probe_of(n), move |tx| {
                        tx.lock_job(&id(n))?;
                        tx.record_job(&job(n, JobState::Cancelled, None))?;
                        Ok::<_, StorageError>(tx.probe_paused(&id(n), ["", ""])?.job.map(|j| j.state))
                    })
                    .await
                    .unwrap();
                (n, false, own == Some(JobState::Cancelled), Instant::now())
            }));
        }
        let s = store.clone();
        calls.push(Box::pin(async move {
            let (applied, cancelled) =
                s.transact_on(probe_of(900), move |tx| deliver(tx, 900)).await.unwrap();
            (900, applied, cancelled, Instant::now())
        }));
        // Each polled once, in order: they queue in this order.
        for call in &mut calls {
            let _ = futures_util::poll!(call.as_mut());
        }
        let last = tokio::spawn(calls.pop().unwrap()); // kept running: answered when it is
        let name = db.name();
        // Everything but job 900 is answered while the other worker still holds its lock.
        let mut answers =
            tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(calls))
                .await
                .unwrap_or_else(|_| panic!("{name}: the batch waited for the lock of one of its jobs"));
        let released = Instant::now();
        let _ = release.send(());
        answers.push(last.await.unwrap());
        for pair in answers[1..21].chunks(2) {
            let (n, _, cancelled, _) = pair[1];
            assert!(
                cancelled,
                "{name}: the delivery of job {n} did not see its cancellation in the same batch"
            );
        }
        for pair in answers[21..41].chunks(2) {
            let (n, first, _, _) = pair[0];
            assert!(
                first && !pair[1].1,
                "{name}: job {n} applied {} times",
                u8::from(first) + u8::from(pair[1].1)
            );
        }
        for &(n, _, own, _) in &answers[41..46] {
            assert!(own, "{name}: job {n}'s closure did not see its own record");
        }
        let largest = commits.largest.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(held) = held {
            held.await.unwrap();
            let (_, applied, _, at) = answers[46];
            assert!(
                !applied,
                "job 900 was applied beside the other worker's record of it: a probe read without its lock"
            );
            assert!(at >= released, "job 900 was decided before the other worker released it");
            assert!(largest >= 30, "{name}: the queued closures did not share a batch (largest {largest})");
        }
        eprintln!("{name}: largest commit {largest} closures");
    }
}

#[tokio::test]
async fn workers_starting_together_migrate_a_new_database_once() {
    let db = Db::postgres().await;
    let opened: Vec<Result<Store, StorageError>> =
        futures_util::future::join_all((0..4).map(|_| Store::open(&db.location, keyring(), &[NOTES]))).await;
    for o in &opened {
        assert!(o.is_ok(), "{o:?}");
    }
    let (url, password) = db.pg.as_ref().unwrap();
    let c = admin_connection(url, password).await;
    let version: i64 =
        c.query_one("SELECT version FROM families WHERE name = 'notes'", &[]).await.unwrap().get(0);
    assert_eq!(version, 2);
    let schema: i64 = c.query_one("SELECT version FROM gatehouse_schema", &[]).await.unwrap().get(0);
    assert!(schema >= 1);
    assert_eq!(c.query_one("SELECT count(*) FROM gatehouse_schema", &[]).await.unwrap().get::<_, i64>(0), 1);
}

#[tokio::test]
async fn pruning_and_events_work_on_both_backends() {
    for db in Db::both().await {
        let store = db.open().await;
        store
            .transact(|tx| {
                for n in 0..5 {
                    tx.record_job(&job(100 + n, JobState::Succeeded, None))?;
                }
                tx.record_job(&job(200, JobState::Running, None))
            })
            .await
            .unwrap();
        let kinds = store.transact(|tx| tx.decided_kinds()).await.unwrap();
        assert_eq!(kinds, ["ledger.apply"], "{}", db.name());
        let events = store.transact(|tx| tx.job_events(&id(100), "c", 0, 10)).await.unwrap();
        assert_eq!(events.len(), 1, "{}", db.name());
        let pruned = store
            .transact(|tx| tx.prune_decided("ledger.apply", gatehouse_protocol::clock::now_ms() + 1, 3))
            .await
            .unwrap();
        assert_eq!(pruned, 3, "{}", db.name());
        let pruned = store
            .transact(|tx| tx.prune_decided("ledger.apply", gatehouse_protocol::clock::now_ms() + 1, 100))
            .await
            .unwrap();
        assert_eq!(pruned, 2, "{}: only decided jobs go", db.name());
        assert!(store.transact(|tx| tx.job(&id(200))).await.unwrap().is_some());
        // Their events went with them (the trigger), the running job's stay.
        let gone = store.transact(|tx| tx.job_events(&id(100), "c", 0, 10)).await.unwrap();
        assert!(gone.is_empty(), "{}", db.name());
        let kept = store.transact(|tx| tx.job_events(&id(200), "c", 0, 10)).await.unwrap();
        assert_eq!(kept.len(), 1, "{}", db.name());
        // The log holds transitions (written with the record: on PostgreSQL in one statement):
        // the same state again adds nothing, a new one adds one, numbered on.
        store.transact(|tx| tx.record_job(&job(200, JobState::Running, None))).await.unwrap();
        store.transact(|tx| tx.record_job(&job(200, JobState::Succeeded, None))).await.unwrap();
        let log = store.transact(|tx| tx.job_events(&id(200), "c", 0, 10)).await.unwrap();
        let log: Vec<(u64, JobState)> = log.iter().map(|e| (e.seq, e.status)).collect();
        assert_eq!(log, [(1, JobState::Running), (2, JobState::Succeeded)], "{}", db.name());
    }
}

fn members(jobs: &[JobId]) -> Vec<gatehouse_storage::Member> {
    jobs.iter()
        .map(|id| gatehouse_storage::Member { id: id.clone(), step: None, after: Vec::new() })
        .collect()
}

/// A job waiting for two parents is released (made due) only once both are decided, and only
/// parents of its own client count; its parents' rows go when it stops waiting. A workflow's
/// steps are listed from its members (an index, no scan of the client's jobs).
#[tokio::test]
async fn a_child_is_released_once_every_parent_is_decided_on_both_backends() {
    for db in Db::both().await {
        let store = db.open().await;
        // 1003 waits for 1001 and 1002; 1005 for those and for 1004, another client's job.
        let (child, foreign) = (id(1003), id(1005));
        let parents = vec![id(1001), id(1002)];
        let (c, f, ps) = (child.clone(), foreign.clone(), parents.clone());
        store
            .transact(move |tx| {
                tx.record_job(&job(1001, JobState::Succeeded, None))?;
                tx.record_job(&job(1002, JobState::Running, None))?;
                let mut theirs = job(1004, JobState::Succeeded, None);
                theirs.client = "other".into();
                tx.record_job(&theirs)?;
                tx.record_job(&job(1003, JobState::WaitingForParents, None))?;
                tx.record_job(&job(1005, JobState::WaitingForParents, None))?;
                tx.wait_for_parents(&c, &ps, b"message")?;
                tx.wait_for_parents(&f, &[ps[0].clone(), ps[1].clone(), id(1004)], b"message")
            })
            .await
            .unwrap();
        let now = gatehouse_protocol::clock::now_ms();
        let release = move |tx: &mut gatehouse_storage::Tx<'_>| tx.release_children(now, 10);
        assert_eq!(store.transact(release).await.unwrap(), 0, "{}: a parent runs still", db.name());
        store.transact(|tx| tx.record_job(&job(1002, JobState::Failed, None))).await.unwrap();
        assert_eq!(
            store.transact(release).await.unwrap(),
            1,
            "{}: both decided (not the foreign one)",
            db.name()
        );
        assert_eq!(store.transact(release).await.unwrap(), 0, "{}: released once", db.name());
        let due = store.transact(move |tx| tx.claim_due_scheduled(now, now + 1000, 10)).await.unwrap();
        let due: Vec<JobId> = due.into_iter().map(|(id, _)| id).collect();
        assert_eq!(due, std::slice::from_ref(&child), "{}", db.name());
        let states =
            store.transact(move |tx| tx.parents(&[id(1001), id(1002), id(1004)], "c")).await.unwrap();
        let states: Vec<Option<JobState>> = states.into_iter().map(|j| j.map(|j| j.state)).collect();
        assert_eq!(states, [Some(JobState::Succeeded), Some(JobState::Failed), None], "{}", db.name());
        let c = child.clone();
        store.transact(move |tx| tx.stop_waiting_for_parents(&c)).await.unwrap();
        let rows = db.raw("SELECT CAST(COUNT(*) AS TEXT) FROM job_parents").await;
        assert_eq!(rows.as_deref(), Some("3"), "{}: the released child's parents' rows went", db.name());
        // A client with thousands of jobs: a list within one batch looks its members up by id,
        // never walks the client's list.
        store
            .transact(|tx| (2_000..5_000).try_for_each(|n| tx.record_job(&job(n, JobState::Succeeded, None))))
            .await
            .unwrap();
        let _ = db.raw("ANALYZE").await;
        let plan = store.read(|tx| tx.list_jobs_plan(true)).await.unwrap();
        println!("{}: list within a batch or workflow:\n{plan}", db.name());
        assert!(
            !plan.contains("jobs_by_client")
                && !plan.contains("Seq Scan on jobs")
                && !plan.contains("SCAN j"),
            "{}: walks the client's jobs:\n{plan}",
            db.name()
        );
    }
}

/// A batch is recorded once, read by its owner only (jobs in order, counted by state, pruned
/// ones as `expired`), and forgotten once retention pruned every one of its jobs.
#[tokio::test]
async fn batches_are_recorded_once_read_by_their_owner_and_pruned_with_their_jobs_on_both_backends() {
    for db in Db::both().await {
        let store = db.open().await;
        let (batch, jobs) = (id(900), vec![id(903), id(901), id(902)]);
        let (b, j) = (batch.clone(), members(&jobs));
        let recorded = store
            .transact(move |tx| {
                tx.record_job(&job(901, JobState::Succeeded, None))?;
                tx.record_job(&job(902, JobState::Queued, None))?;
                tx.record_job(&job(903, JobState::Failed, None))?;
                Ok::<_, StorageError>((
                    tx.record_batch(&b, "c", false, &j, None)?,
                    tx.record_batch(&b, "c", false, &j, None)?,
                ))
            })
            .await
            .unwrap();
        assert_eq!(recorded, (true, false), "{}: recorded once", db.name());
        let b = batch.clone();
        let read = store
            .transact(move |tx| {
                Ok::<_, StorageError>((tx.batch_of(&b, "c", None)?, tx.batch_of(&b, "other", None)?))
            })
            .await
            .unwrap();
        let (mine, theirs) = read;
        let mine = mine.unwrap_or_else(|| panic!("{}: the owner reads it", db.name()));
        assert!(theirs.is_none(), "{}: nobody else does", db.name());
        assert_eq!(mine.jobs, jobs, "{}: in order", db.name());
        let counts: Vec<(&str, usize)> = mine.counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(counts, [("failed", 1), ("queued", 1), ("succeeded", 1)], "{}", db.name());
        assert_eq!(mine.status, "running", "{}: one is queued", db.name());

        let now = gatehouse_protocol::clock::now_ms() + 1;
        store.transact(move |tx| tx.prune_decided("ledger.apply", now, 100)).await.unwrap();
        assert_eq!(
            store.transact(|tx| tx.prune_batches(10)).await.unwrap(),
            0,
            "{}: a job is left",
            db.name()
        );
        let b = batch.clone();
        let left = store.transact(move |tx| tx.batch_of(&b, "c", None)).await.unwrap().unwrap();
        assert_eq!(left.counts.get("expired"), Some(&2), "{}", db.name());
        store.transact(|tx| tx.record_job(&job(902, JobState::Succeeded, None))).await.unwrap();
        let later = gatehouse_protocol::clock::now_ms() + 1;
        store.transact(move |tx| tx.prune_decided("ledger.apply", later, 100)).await.unwrap();
        assert_eq!(store.transact(|tx| tx.prune_batches(10)).await.unwrap(), 1, "{}", db.name());
        let b = batch.clone();
        assert!(
            store.transact(move |tx| tx.batch_of(&b, "c", None)).await.unwrap().is_none(),
            "{}",
            db.name()
        );
        let rows = db.raw("SELECT CAST(COUNT(*) AS TEXT) FROM batch_jobs").await;
        assert_eq!(rows.as_deref(), Some("0"), "{}: its jobs' rows went with it", db.name());
        // A batch's jobs are recorded only if new: a job recorded meanwhile keeps its state.
        store.transact(|tx| tx.record_job(&job(950, JobState::Succeeded, None))).await.unwrap();
        let held = store
            .transact(|tx| {
                Ok::<_, StorageError>((
                    tx.record_new_job(&job(950, JobState::Scheduled, None))?,
                    tx.record_new_job(&job(951, JobState::Scheduled, None))?,
                ))
            })
            .await
            .unwrap();
        assert_eq!(held, (false, true), "{}", db.name());
        let kept = store.transact(|tx| tx.job(&id(950))).await.unwrap().unwrap();
        assert_eq!(kept.state, JobState::Succeeded, "{}: not reset to scheduled", db.name());

        // A job that runs now (its hold's record gone, its outcome not yet recorded) is neither
        // decided nor expired: the batch's on_complete waits for it. (It ran early before.)
        let (b, j) = (id(960), members(&[id(961), id(962)]));
        let on_complete = (id(963), serde_json::json!({"kind": "vault.put"}));
        store
            .transact(move |tx| {
                tx.record_job(&job(961, JobState::Succeeded, None))?;
                tx.record_batch(&b, "c", false, &j, Some((&on_complete.0, &on_complete.1)))?;
                tx.log_state(&id(962), "c", JobState::Scheduled)?;
                tx.log_state(&id(962), "c", JobState::Queued)
            })
            .await
            .unwrap();
        let due = store.transact(|tx| tx.complete_batches(10)).await.unwrap();
        assert!(due.is_empty(), "{}: complete while a job runs", db.name());
        let b = id(960);
        let running = store.transact(move |tx| tx.batch_of(&b, "c", None)).await.unwrap().unwrap();
        let counts: Vec<(&str, usize)> = running.counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(counts, [("queued", 1), ("succeeded", 1)], "{}", db.name());
        store.transact(|tx| tx.record_job(&job(962, JobState::Failed, None))).await.unwrap();
        let due = store.transact(|tx| tx.complete_batches(10)).await.unwrap();
        assert_eq!(due.len(), 1, "{}: complete once every job is decided", db.name());
    }
}

/// A statement refused for what it holds is told apart from trouble with storage (the worker
/// counts the job's attempt for the one, waits for storage for the other), and its error never
/// quotes the value: PostgreSQL's message for a data exception does (`invalid input syntax for
/// type integer: "…"`), and errors reach logs and job records. On PostgreSQL the same holds for
/// a parameter the driver refuses before sending it (it used to read as a lost connection).
#[tokio::test]
async fn a_refused_statement_is_the_transactions_own_and_never_quotes_its_values_on_both_backends() {
    for db in Db::both().await {
        let store = db.open().await;
        store.transact(|tx| put_note(tx, "taken", "c", &json!("first"))).await.unwrap();
        let taken = store.transact(|tx| put_note(tx, "taken", "c", &json!("again"))).await.unwrap_err();
        assert!(taken.is_refused_statement() && taken.refusal().is_none(), "{}: {taken:?}", db.name());
        // A statement the database cannot run (a table it does not know): refused alike.
        let unknown =
            store.transact(|tx| tx.execute("DELETE FROM no_such_table", params![])).await.unwrap_err();
        assert!(unknown.is_refused_statement() && unknown.refusal().is_none(), "{}: {unknown:?}", db.name());
        if db.pg.is_some() {
            let bad = store
                .transact(|tx| {
                    tx.query("SELECT CAST(CAST(?1 AS TEXT) AS INTEGER)", params!["secret-71"]).map(|_| ())
                })
                .await
                .unwrap_err();
            assert!(bad.is_refused_statement(), "{bad:?}");
            assert!(!format!("{bad:?} {bad}").contains("secret-71"), "the value reached the error: {bad:?}");
            // A parameter the driver cannot send as the type the server inferred (a number out
            // of the column's range, a value of the wrong kind) is refused like the server
            // refuses the same mistake: not storage out of reach.
            let big = store
                .transact(|tx| {
                    tx.query("SELECT CAST(?1 AS INTEGER)", params![71_000_000_000_i64]).map(|_| ())
                })
                .await
                .unwrap_err();
            assert!(big.is_refused_statement() && big.refusal().is_none(), "{big:?}");
            assert!(!format!("{big:?}").contains("71000000000"), "the value reached the error: {big:?}");
            let kind = store.transact(|tx| {
                put_note(tx, "n", "c", &json!(1))
                    .and_then(|_| tx.execute("UPDATE notes SET body = ?1 WHERE id = 'n'", params![7_i64]))
            });
            let kind = kind.await.unwrap_err();
            assert!(kind.is_refused_statement() && kind.refusal().is_none(), "{kind:?}");
        }
    }
}

#[tokio::test]
async fn bad_storage_urls_are_clear_errors() {
    let e = Location::parse("postgres://u:hunter2@127.0.0.1/db", None, 4).unwrap_err().to_string();
    assert!(e.contains("password must not be in the url") && !e.contains("hunter2"), "{e}");
    let e = Location::parse("mysql://x", None, 4).unwrap_err().to_string();
    assert!(e.contains("expected sqlite:<path> or postgres://"), "{e}");
    // A wrong password: refused, and the error does not carry it.
    let (url, _) = fresh_database().await;
    let location = Location::parse(&url, Some("not-the-password".into()), 2).unwrap();
    let e = Store::open(&location, keyring(), &[]).await.expect_err("refused").to_string();
    assert!(e.contains("password authentication failed") && !e.contains("not-the-password"), "{e}");
    let _ = Arc::new(());
}

/// Several workers sweep the same held messages (delayed jobs, expired gaps): each is claimed
/// by one sweep, and comes back to be claimed again once that claim has run out.
#[tokio::test]
async fn each_held_message_is_claimed_by_one_sweep() {
    for db in Db::both().await {
        let stores: Vec<Store> = futures_util::future::join_all((0..3).map(|_| db.open())).await;
        stores[0]
            .transact(|tx| {
                for n in 0..40 {
                    tx.record_job(&job(300 + n, JobState::Scheduled, None))?;
                    tx.schedule(&id(300 + n), 1, b"message")?;
                }
                for n in 0..40u32 {
                    tx.record_job(&job(
                        400 + n,
                        JobState::WaitingForSequence,
                        Some(("gap", u64::from(n) + 2)),
                    ))?;
                    tx.park(&gatehouse_storage::Parked {
                        job_id: id(400 + n),
                        seq_key: "gap".into(),
                        seq_number: u64::from(n) + 2,
                        envelope: b"message".to_vec(),
                        reply_to: None,
                        correlation_id: None,
                        deadline_ms: 1,
                    })?;
                }
                Ok::<_, StorageError>(())
            })
            .await
            .unwrap();
        let now = gatehouse_protocol::clock::now_ms();
        let mut sweeps = Vec::new();
        for i in 0..12 {
            let store = stores[i % 3].clone();
            sweeps.push(tokio::spawn(async move {
                // Each sweeper sweeps until it finds nothing more.
                let (mut due, mut gaps) = (Vec::new(), Vec::new());
                loop {
                    let (d, g) = store
                        .transact(move |tx| {
                            let due = tx.claim_due_scheduled(now, now + 60_000, 7)?;
                            let gaps = tx.claim_expired_parked(now, now + 60_000, 7)?;
                            Ok::<_, StorageError>((
                                due.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
                                gaps.into_iter().map(|p| p.job_id).collect::<Vec<_>>(),
                            ))
                        })
                        .await
                        .unwrap();
                    if d.is_empty() && g.is_empty() {
                        return (due, gaps);
                    }
                    due.extend(d);
                    gaps.extend(g);
                }
            }));
        }
        let (mut due, mut gaps) = (Vec::new(), Vec::new());
        for s in sweeps {
            let (d, g) = s.await.unwrap();
            due.extend(d);
            gaps.extend(g);
        }
        for (what, mut ids) in [("delayed", due), ("parked", gaps)] {
            let n = ids.len();
            ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            ids.dedup();
            assert_eq!(ids.len(), n, "{}: a {what} message was claimed twice", db.name());
            assert_eq!(n, 40, "{}: {what} messages claimed", db.name());
        }
        // A claim that ran out (its sweeper died) lets the message be claimed again.
        let again = stores[1]
            .transact(move |tx| tx.claim_due_scheduled(now + 60_001, now + 120_000, 100))
            .await
            .unwrap();
        assert_eq!(again.len(), 40, "{}", db.name());
    }
}

/// A client's job list (`GET /v1/jobs`): its own jobs only, newest first, filtered, paged by a
/// cursor without a repeat or a gap; answered from the index `jobs_by_client` on both backends,
/// never a scan of the table (the plans, with 3,000 jobs of another client beside).
#[tokio::test]
async fn a_clients_jobs_are_listed_newest_first_from_the_index() {
    use gatehouse_storage::JobFilter;
    for db in Db::both().await {
        let store = db.open().await;
        store
            .transact(|tx| {
                for n in 0..3000 {
                    tx.record_job(&StoredJob {
                        client: "many".into(),
                        submitted_at_ms: Some(i64::from(n)),
                        ..job(10_000 + n, JobState::Succeeded, None)
                    })?;
                }
                for n in 0..20u32 {
                    let (kind, state) = if n % 4 == 0 {
                        ("vault.put", JobState::Failed)
                    } else {
                        ("ledger.apply", JobState::Succeeded)
                    };
                    // Two jobs a millisecond: the id orders those.
                    let at = Some(1_000 + i64::from(n / 2));
                    tx.record_job(&StoredJob {
                        client: "alice".into(),
                        kind: kind.into(),
                        submitted_at_ms: at,
                        ..job(n, state, None)
                    })?;
                }
                tx.execute("ANALYZE", params![])?;
                Ok::<_, StorageError>(())
            })
            .await
            .unwrap();
        let list = |filter: JobFilter| {
            let store = store.clone();
            async move { store.read(move |tx| tx.list_jobs("alice", &filter)).await.unwrap() }
        };
        let all = list(JobFilter { limit: 100, ..JobFilter::default() }).await;
        assert_eq!(all.len(), 20, "{}: alice's jobs only", db.name());
        let order: Vec<(i64, String)> = all.iter().map(|j| (j.submitted_at_ms, j.id.clone())).collect();
        let mut newest_first = order.clone();
        newest_first.sort_by(|a, b| b.cmp(a));
        assert_eq!(order, newest_first, "{}", db.name());
        // Pages of 7 along the cursor: every job once.
        let (mut paged, mut after) = (Vec::new(), None);
        loop {
            let page = list(JobFilter { limit: 7, after: after.clone(), ..JobFilter::default() }).await;
            let Some(last) = page.last() else { break };
            after = Some((last.submitted_at_ms, last.id.clone()));
            paged.extend(page.into_iter().map(|j| j.id));
        }
        assert_eq!(paged, all.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), "{}", db.name());
        let failed =
            list(JobFilter { state: Some("failed".into()), limit: 100, ..JobFilter::default() }).await;
        assert!(
            failed.len() == 5 && failed.iter().all(|j| j.kind == "vault.put"),
            "{}: {failed:?}",
            db.name()
        );
        let kind =
            list(JobFilter { kind: Some("ledger.apply".into()), limit: 100, ..JobFilter::default() }).await;
        assert_eq!(kind.len(), 15, "{}", db.name());
        let recent =
            list(JobFilter { submitted_after_ms: Some(1_007), limit: 100, ..JobFilter::default() }).await;
        assert_eq!(recent.len(), 4, "{}", db.name());
        let plan = store.read(|tx| tx.list_jobs_plan(false)).await.unwrap();
        println!("{}: list_jobs plan:\n{plan}", db.name());
        assert!(plan.contains("jobs_by_client"), "{}: not from the index:\n{plan}", db.name());
        assert!(
            !plan.contains("SCAN j\n") && !plan.contains("Seq Scan on jobs"),
            "{}: a table scan:\n{plan}",
            db.name()
        );
    }
}

/// A turn's lease that ran out: the sweeper claims it and sends its message back, and the
/// attempt that message comes back for takes the lease even before the sweeper has ended it
/// (the message can be back first); the sweeper's end then leaves that attempt's lease alone.
/// Before, the attempt was told another one held the turn, its delivery was acked, and the
/// sweeper then deleted the lease: the job stayed `running` with its message nowhere.
#[tokio::test]
async fn a_lease_sent_back_goes_to_the_attempt_it_was_sent_for() {
    for db in Db::both().await {
        let store = db.open().await;
        let now = gatehouse_protocol::clock::now_ms();
        store
            .transact(move |tx| tx.lease_turn(&id(500), b"message", now - 1, "dead attempt", now - 10))
            .await
            .unwrap();
        let claimed = store.transact(move |tx| tx.claim_expired_leases(now, now + 60_000, 10)).await.unwrap();
        assert_eq!(claimed.len(), 1, "{}", db.name());
        // The message is back; its attempt arrives before the sweeper ends the lease.
        let took = store
            .transact(move |tx| tx.lease_turn(&id(500), b"message", now + 30_000, "new attempt", now))
            .await;
        assert!(took.unwrap(), "{}: the attempt the message was sent back for was turned away", db.name());
        store.transact(|tx| tx.end_lease(&id(500), gatehouse_storage::SENT_BACK)).await.unwrap();
        let holds = store.transact(|tx| tx.holds_lease(&id(500), "new attempt")).await.unwrap();
        assert!(holds, "{}: the sweeper's end took the new attempt's lease", db.name());
        // A running lease of another attempt still turns a second copy away.
        let second =
            store.transact(move |tx| tx.lease_turn(&id(500), b"message", now + 30_000, "copy", now)).await;
        assert!(!second.unwrap(), "{}", db.name());
    }
}

/// TLS to PostgreSQL: with the CA that signed the server's certificate the connection is
/// encrypted (the server says so); a certificate from another CA is refused; a url that asks
/// for TLS without a CA to check it is a settings error.
#[tokio::test]
async fn tls_to_postgres_checks_the_server_certificate() {
    let (url, password) = fresh_database().await;
    let node = gatehouse_e2e::postgres();
    let tls_url = url.replace("sslmode=disable", "sslmode=require");
    let location =
        Location::parse_with_tls(&tls_url, Some(password.clone()), 2, Some(node.tls_ca())).unwrap();
    let store = Store::open(&location, keyring(), &[]).await.unwrap();
    let ssl = store
        .transact(|tx| {
            tx.query_row("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", params![], |r| {
                r.get::<bool>(0)
            })
        })
        .await
        .unwrap();
    assert_eq!(ssl, Some(true), "the connection is not encrypted");

    let other = TempDir::new().unwrap();
    gatehouse_devenv::certs::write_dev(other.path()).unwrap();
    let wrong = Location::parse_with_tls(
        &tls_url,
        Some(password.clone()),
        2,
        Some(other.path().join("components-ca.pem")),
    )
    .unwrap();
    let e = Store::open(&wrong, keyring(), &[])
        .await
        .expect_err("a server with a certificate of another CA")
        .to_string();
    assert!(e.contains("certificate") || e.contains("UnknownIssuer"), "{e}");

    let unchecked = Location::parse(&tls_url, Some(password), 2).unwrap();
    let e = Store::open(&unchecked, keyring(), &[]).await.expect_err("refused").to_string();
    assert!(e.contains("set [storage] tls_ca"), "{e}");
}
