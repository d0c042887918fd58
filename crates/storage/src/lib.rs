//! The worker's storage: the only place that holds job outcomes, vault records and ledgers.
//! Nothing but the worker (and operator commands) depends on this crate.
//!
//! Vault records and job results are encrypted at rest (AES-256-GCM, key id stored with each
//! value, see `gatehouse_protocol::crypto::Keyring`); [`Tx::rekey`] moves old values to the
//! active key.
//!
//! SQLite is the embedded default: WAL journal, `synchronous = FULL` (an outcome that the
//! worker acked is on disk), schema migrations by `user_version`. One thread owns the
//! connection and runs each [`Store::transact`] closure in its own transaction, so every
//! decision about a job (dedupe, sequence, effect, outcome) commits or rolls back as one.

mod migrations;
mod tx;

use std::path::Path;
use std::thread;

use gatehouse_protocol::crypto::Keyring;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

pub use tx::{Attempts, Parked, StoredJob, Tx, now_ms};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the storage thread has stopped")]
    Closed,
    /// A value encrypted at rest could not be decrypted (unknown key id, altered data).
    #[error("encrypted value: {0}")]
    Crypto(String),
    /// The closure panicked; its transaction was rolled back.
    #[error("panic while running the job: {0}")]
    Panicked(String),
}

impl StorageError {
    /// Whether trying again later may succeed (database busy or locked, disk I/O or full).
    pub fn is_transient(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(e.code, C::DatabaseBusy | C::DatabaseLocked | C::SystemIoFailure | C::DiskFull)
            }
            Self::Closed => true,
            _ => false,
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

type Work = Box<dyn FnOnce(&mut Connection, &Keyring) + Send>;

/// Handle to the storage thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    work: mpsc::Sender<Work>,
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and migrates it.
    ///
    /// # Errors
    /// When the file cannot be opened or a migration fails.
    /// Vault records and job results are encrypted with `keyring` (see [`Tx`]).
    pub fn open_sqlite(path: &Path, keyring: Keyring) -> Result<Self, StorageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StorageError::Corrupt(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations::run(&mut conn)?;

        let (work, mut rx) = mpsc::channel::<Work>(1024);
        thread::Builder::new()
            .name("gatehouse-storage".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(&mut conn, &keyring);
                }
            })
            .map_err(|e| StorageError::Corrupt(format!("cannot start storage thread: {e}")))?;
        Ok(Self { work })
    }

    /// Runs `f` in one transaction on the storage thread: committed when it returns `Ok`,
    /// rolled back when it returns `Err`.
    ///
    /// # Errors
    /// What `f` returns, or a failure to begin or commit.
    pub async fn transact<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StorageError> + Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let work: Work = Box::new(move |conn, keyring| {
            let run = || -> Result<R, E> {
                let mut tx = Tx::begin(conn, keyring)?;
                let value = f(&mut tx)?;
                tx.commit()?;
                Ok(value)
            };
            // A panicking closure rolls its transaction back (dropped during unwinding); the
            // caller gets `Panicked` and the thread serves the next closure.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .unwrap_or_else(|p| Err(StorageError::Panicked(panic_message(&*p)).into()));
            let _ = done.send(result);
        });
        self.work.send(work).await.map_err(|_| StorageError::Closed)?;
        result.await.map_err(|_| StorageError::Closed)?
    }
}
