//! WAL checkpoints on their own thread and connection.
//!
//! A checkpoint copies committed pages from the write-ahead log back into the database file
//! and syncs it. By default SQLite runs one inside whichever commit takes the log past 1,000
//! pages, so that commit — and every job of its group waiting for the answer — pays for it.
//! Here the storage thread only tells this thread that it committed, and this thread
//! checkpoints a little later, once per burst ([`PAUSE`]), `PASSIVE`: beside the writer,
//! never blocking it. SQLite starts the log afresh only once every page in it has been copied
//! back, which a writer that never pauses would not let happen; so once the log has reached
//! [`REWIND_AT`] pages (less on a nearly full disk, see [`rewind_at`]), one more checkpoint
//! runs between two of the writer's transactions (it waits for its [`Checkpoints::turn`]), and
//! the log is rewound.

use std::fs::File;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::StorageError;

/// How long after a commit the checkpoint comes: the commits of a burst share one.
const PAUSE: Duration = Duration::from_millis(200);

/// Most extra passes beside the writer before a rewind, each copying what was committed
/// during the one before; they stop once a pass is quicker than [`QUICK_PASS`].
const CATCH_UP_PASSES: usize = 4;
const QUICK_PASS: Duration = Duration::from_millis(10);

/// Log pages (4 KiB: 32 MiB) from which the log is rewound even while commits keep coming.
const REWIND_AT: i64 = if cfg!(test) { 64 } else { 8_192 };

/// The writer's side: tells the checkpoint thread that something was committed.
pub(crate) struct Checkpoints {
    committed: SyncSender<()>,
    turn: Arc<Turn>,
    truncate: Truncate,
}

/// Copies the log back whole and cuts it to nothing, between two transactions: after
/// storage refused writes (a full disk). The log may have grown while no checkpoint could run,
/// and its file holds room that a small write fits in while the disk is still full; a rewind
/// alone keeps the file at its size.
#[derive(Clone)]
pub(crate) struct Truncate {
    conn: Arc<Mutex<Connection>>,
    turn: Arc<Turn>,
}

impl Truncate {
    /// Blocks until the log is truncated, or answers why not: a reader holds it (busy: try
    /// again later), or the copy failed (the disk is still full).
    pub(crate) fn now(&self) -> Result<(), StorageError> {
        let conn = lock(&self.conn);
        let busy = self.turn.between_transactions(|| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0))
        })?;
        if busy != 0 {
            let busy = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY);
            return Err(rusqlite::Error::SqliteFailure(busy, Some("a reader holds the log".into())).into());
        }
        tracing::info!("log copied back and truncated after storage refused writes");
        Ok(())
    }
}

/// Who uses the database: the writer, one transaction at a time, or the checkpoint thread to
/// rewind the log. A rewind that asks goes next: with a plain mutex the writer would take its
/// turn again and again before the checkpoint thread even woke up (measured: waits of up to
/// 0.8 s).
#[derive(Default)]
struct Turn {
    rewind_waiting: Mutex<bool>,
    rewound: Condvar,
    db: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Turn {
    fn writer(&self) -> MutexGuard<'_, ()> {
        let mut waiting = lock(&self.rewind_waiting);
        while *waiting {
            waiting = self.rewound.wait(waiting).unwrap_or_else(PoisonError::into_inner);
        }
        drop(waiting);
        lock(&self.db)
    }

    /// Runs `f` between two of the writer's transactions.
    fn between_transactions<T>(&self, f: impl FnOnce() -> T) -> T {
        *lock(&self.rewind_waiting) = true;
        let out = {
            let _db = lock(&self.db);
            f()
        };
        *lock(&self.rewind_waiting) = false;
        self.rewound.notify_all();
        out
    }
}

impl Checkpoints {
    /// Starts the checkpoint thread for the database at `path` (whose writer must have
    /// automatic checkpoints turned off); it ends when this is dropped.
    pub(crate) fn start(path: &Path, observer: crate::Observer) -> Result<Self, StorageError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let db = File::open(path)
            .map_err(|e| StorageError::Corrupt(format!("cannot open {}: {e}", path.display())))?;
        let truncating = Connection::open(path)?;
        truncating.busy_timeout(Duration::from_secs(5))?;
        let (committed, rx) = sync_channel(1);
        let turn = Arc::new(Turn::default());
        let writer_turn = turn.clone();
        let truncate = Truncate { conn: Arc::new(Mutex::new(truncating)), turn: turn.clone() };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
        thread::Builder::new()
            .name("gatehouse-checkpoint".into())
            .spawn(move || run(&conn, &db, &dir, &rx, &writer_turn, &observer))
            .map_err(|e| StorageError::Corrupt(format!("cannot start checkpoint thread: {e}")))?;
        Ok(Self { committed, turn, truncate })
    }

    /// What truncates the log.
    pub(crate) fn truncate(&self) -> Truncate {
        self.truncate.clone()
    }

    /// The writer's turn: held from the start of a transaction to its commit.
    pub(crate) fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.writer()
    }

    /// Something was committed: a checkpoint is due soon.
    pub(crate) fn committed(&self) {
        match self.committed.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => tracing::warn!("the checkpoint thread has stopped"),
        }
    }
}

fn run(
    conn: &Connection,
    db: &File,
    dir: &Path,
    committed: &Receiver<()>,
    turn: &Turn,
    observer: &crate::Observer,
) {
    let told = |started: Instant, rewind: bool| {
        if let Some(o) = observer.get() {
            o.checkpointed(started.elapsed(), rewind);
        }
    };
    // Said once until a checkpoint succeeds again (a full disk fails every one).
    let mut failing = false;
    while committed.recv().is_ok() {
        thread::sleep(PAUSE);
        while committed.try_recv().is_ok() {}
        let started = Instant::now();
        let done = pass(conn, db).and_then(|log| {
            told(started, false);
            if log < rewind_at(dir) {
                return Ok(());
            }
            // Catch up beside the writer until little is left to copy ...
            for _ in 0..CATCH_UP_PASSES {
                let started = Instant::now();
                pass(conn, db)?;
                if started.elapsed() < QUICK_PASS {
                    break;
                }
            }
            // ... then, with the writer held off, copy the rest: its next transaction starts
            // the log afresh.
            let rewind = Instant::now();
            let rewound = turn.between_transactions(|| checkpoint(conn).map(drop));
            told(rewind, true);
            rewound.map_err(Into::into)
        });
        // The next commit brings another try; meanwhile the log only grows.
        match done {
            Err(e) if !failing => {
                tracing::warn!(error = %e, "checkpoint failed; the log grows until one succeeds");
                failing = true;
            }
            Err(e) => tracing::debug!(error = %e, "checkpoint failed again"),
            Ok(()) if failing => {
                tracing::info!("checkpoints succeed again");
                failing = false;
            }
            Ok(()) => {}
        }
    }
}

/// Log pages from which the log is rewound: [`REWIND_AT`], or a quarter of the room left on
/// the database's file system when that is less. Rewinding keeps the log's file at its size
/// and reuses it; on a nearly full disk a log that only grows would take the room the
/// database file needs for the pages copied back, and then no checkpoint could ever succeed.
fn rewind_at(dir: &Path) -> i64 {
    rustix::fs::statvfs(dir).map_or(REWIND_AT, |fs| {
        let free = fs.f_bavail.saturating_mul(fs.f_frsize) / 4 / 4096;
        REWIND_AT.min(i64::try_from(free).unwrap_or(i64::MAX)).max(1)
    })
}

/// A `PASSIVE` checkpoint beside the writer, then the database file synced; answers the pages
/// in the log. SQLite syncs the database only after a checkpoint that copied the whole log, so
/// without this the rewind (the one checkpoint that holds the writer off) would flush every
/// page the passes before it wrote: ~150 ms with a 128 MiB log on this disk, measured.
fn pass(conn: &Connection, db: &File) -> Result<i64, Box<dyn std::error::Error>> {
    let log = checkpoint(conn)?;
    db.sync_data()?;
    Ok(log)
}

/// Runs a `PASSIVE` checkpoint; answers the pages in the log.
fn checkpoint(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
}

#[cfg(test)]
mod tests {
    use gatehouse_protocol::crypto::Keyring;
    use serde_json::json;

    use super::*;
    use crate::Store;

    /// The log's checkpoint sequence number (bytes 12..16 of its header, big-endian), which
    /// SQLite increments each time it starts the log afresh.
    fn rewinds(wal: &Path) -> u32 {
        let header = std::fs::read(wal).unwrap();
        u32::from_be_bytes(header[12..16].try_into().unwrap())
    }

    #[tokio::test]
    async fn a_steady_writer_has_its_log_copied_back_and_rewound() {
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = (dir.path().join("db"), dir.path().join("db-wal"));
        let keyring = Keyring::parse(&format!("k1 {}", "ab".repeat(32))).unwrap();
        let store = Store::open_sqlite(&db, keyring, &[]).unwrap();
        let next = std::sync::atomic::AtomicU64::new(0);
        let put = || {
            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut raw = [0u8; 16];
            raw[8..].copy_from_slice(&n.to_be_bytes());
            let id = gatehouse_protocol::JobId::from_bytes(raw);
            let job = crate::StoredJob {
                id: id.clone(),
                client: "o".into(),
                kind: "k".into(),
                state: gatehouse_protocol::JobState::Succeeded,
                result: Some(json!({"pad": "x".repeat(3000)})),
                error: None,
                reason: None,
                sequence: None,
                submitted_at_ms: None,
            };
            let store = store.clone();
            async move { store.transact(move |tx| tx.record_job(&job)).await.map(|()| id) }
        };
        // Past REWIND_AT pages at once: every commit writes at least one page to the log.
        let mut tokens = Vec::new();
        for _ in 0..REWIND_AT + 10 {
            tokens.push(put().await.unwrap());
        }
        let (before, db_before) = (rewinds(&wal), std::fs::metadata(&db).unwrap().len());
        // Commits keep coming (nothing else would ever copy the log back or rewind it: the
        // writer's own automatic checkpoints are off).
        let deadline = Instant::now() + Duration::from_secs(10);
        while rewinds(&wal) == before {
            assert!(Instant::now() < deadline, "the log was not rewound within 10 s");
            tokens.push(put().await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let db_after = std::fs::metadata(&db).unwrap().len();
        assert!(db_after > db_before + 64 * 4096, "pages copied back: {db_before} -> {db_after} bytes");
        // Nothing was lost on the way.
        for token in tokens {
            let found = store.transact(move |tx| tx.job(&token)).await.unwrap();
            assert!(found.is_some());
        }
    }
}
