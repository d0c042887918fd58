//! The worker's storage: the only place that holds job outcomes, and the tables of the handler
//! families (vault records, ledgers, a custom worker's own; see [`Family`]). Nothing but the
//! worker (and operator commands) depends on this crate.
//!
//! Job results and the values families declare sealed are encrypted at rest (AES-256-GCM, key id
//! stored with each value, see `gatehouse_protocol::crypto::Keyring`), each bound to its table,
//! column, row and owner; plaintext where a sealed value belongs is refused. [`Tx::rekey`]
//! moves old values to the active key. The database file and its -wal/-shm are mode 0600.
//!
//! SQLite is the embedded default: WAL journal, `synchronous = FULL` (an outcome that the
//! worker acked is on disk), schema migrations by `user_version`. One thread owns the
//! connection and runs each [`Store::transact`] closure atomically (its own savepoint), so
//! every decision about a job (dedupe, sequence, effect, outcome) is kept or undone as one;
//! closures that arrive together share one commit (group commit: one fsync for many jobs).
//! Checkpoints run beside it, on their own thread (see [`checkpoint`]).

mod checkpoint;
mod family;
mod migrations;
mod postgres;
pub mod sql;
mod tx;

use std::path::Path;
use std::thread;

use gatehouse_protocol::crypto::Keyring;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::Checkpoints;

pub use family::{Family, SealedColumn};
pub use postgres::{DEFAULT_WRITERS, JobProbe, PostgresConfig};
pub use tx::{
    Attempts, Forget, JobFilter, ListedJob, Member, Parked, Pause, Place, Probe, SENT_BACK, ScheduleState,
    StoredJob, Tx, sealed_aad,
};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// What PostgreSQL answered (`code`: its SQLSTATE), or why it could not be reached.
    #[error("postgres: {message}{}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Postgres { code: Option<String>, message: String },
    /// The storage settings are wrong (bad url, a password where it must not be).
    #[error("{0}")]
    Config(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the storage thread has stopped")]
    Closed,
    /// A value encrypted at rest could not be decrypted (unknown key id, altered data).
    #[error("encrypted value: {0}")]
    Crypto(String),
    /// The commit failed; nothing of the closure was kept. `refusal`: why, when storage
    /// refuses writes (see [`StorageError::refusal`]).
    #[error("commit failed: {message}")]
    Commit { message: String, refusal: Option<&'static str> },
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
            // No answer (connection lost, server restarting), or a conflict with another
            // transaction, or the server out of resources: classes 08, 40, 53, 57.
            Self::Postgres { code, .. } => code
                .as_deref()
                .is_none_or(|c| ["08", "40", "53", "57"].iter().any(|class| c.starts_with(class))),
            Self::Closed | Self::Commit { .. } => true,
            _ => false,
        }
    }

    /// Whether the database refused the transaction's own statements — a constraint they
    /// break, a value it cannot take, a table or column it does not know — rather than failing
    /// to run them: the same statements would be refused again. A delivery counts the attempt
    /// (the job is dead-lettered after its attempts, never requeued forever). A permission
    /// refused (`42501`) is not counted: that is the database's grants, not the job.
    pub fn is_refused_statement(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            // `Unknown` is SQLITE_ERROR: a statement it cannot run (no such table, bad SQL).
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(e.code, C::ConstraintViolation | C::TooBig | C::TypeMismatch | C::Unknown)
            }
            // Classes 22 (data exception), 23 (integrity constraint violation) and 42 (syntax
            // error or access rule violation).
            Self::Postgres { code: Some(c), .. } => {
                ["22", "23", "42"].iter().any(|class| c.starts_with(class)) && c != "42501"
            }
            _ => false,
        }
    }

    /// How a closure is answered when its transaction failed at commit with `self`: the
    /// statement refusal itself when it is one (on PostgreSQL a deferred write is refused at
    /// commit), otherwise [`StorageError::Commit`].
    pub(crate) fn at_commit(&self) -> StorageError {
        match self {
            Self::Postgres { code, message } if self.is_refused_statement() => {
                Self::Postgres { code: code.clone(), message: message.clone() }
            }
            _ => Self::Commit { message: self.to_string(), refusal: self.refusal() },
        }
    }

    /// Why storage refuses writes, when this error says it does — the disk is full, the
    /// database is read-only, I/O fails, the server cannot be reached — as a few plain words;
    /// `None` for an error of one transaction (a conflict, bad data, a bug). A worker stops
    /// taking jobs on a refusal and waits for storage to come back.
    pub fn refusal(&self) -> Option<&'static str> {
        use rusqlite::ErrorCode as C;
        match self {
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => match e.code {
                C::DiskFull => Some("disk full"),
                C::ReadOnly => Some("read-only database"),
                C::SystemIoFailure => Some("disk I/O error"),
                C::CannotOpen => Some("cannot open the database file"),
                _ => None,
            },
            Self::Postgres { code, .. } => match code.as_deref() {
                None => Some("no connection to PostgreSQL"),
                Some("53100") => Some("PostgreSQL: disk full"),
                Some("25006") => Some("PostgreSQL: read-only transaction"),
                Some("57P01" | "57P02" | "57P03") => Some("PostgreSQL: server shutting down or starting"),
                Some(c) if c.starts_with("08") => Some("PostgreSQL: connection lost"),
                Some(c) if c.starts_with("53") => Some("PostgreSQL: out of resources"),
                Some(c) if c.starts_with("58") => Some("PostgreSQL: I/O error"),
                _ => None,
            },
            Self::Commit { refusal, .. } => *refusal,
            Self::Closed => Some("the storage thread has stopped"),
            _ => None,
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

/// Told what the storage thread and the checkpoint thread do (the worker turns it into
/// metrics). Called on those threads: keep it cheap.
pub trait StorageObserver: Send + Sync {
    /// A group commit of `closures` closures took `took` (BEGIN to COMMIT, fsync included).
    fn committed(&self, took: std::time::Duration, closures: usize);
    /// A checkpoint pass (`rewind`: the one that holds the writer off and restarts the log).
    fn checkpointed(&self, took: std::time::Duration, rewind: bool);
}

/// Where the observer is, once set ([`Store::observe`]).
pub(crate) type Observer = std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn StorageObserver>>>;

/// One closure's part of a batch: run it inside its savepoint; it answers whether it
/// succeeded (keep its writes) and how to deliver its result once the batch's fate is known.
/// Called with `None` when the batch's transaction could not even begin: the closure does
/// not run (outside a transaction its writes would be kept one by one), and it is answered
/// with the batch's failure.
type Work = Box<dyn FnOnce(Option<(&Connection, &Keyring)>) -> Finish + Send>;

/// Delivers a closure's result; `Some(failure)` when its batch failed to commit.
type Deliver = Box<dyn FnOnce(Option<&Failed>) + Send>;

/// Why a batch was not committed.
struct Failed {
    message: String,
    refusal: Option<&'static str>,
}

impl From<rusqlite::Error> for Failed {
    fn from(e: rusqlite::Error) -> Self {
        let message = e.to_string();
        Self { message, refusal: StorageError::Sqlite(e).refusal() }
    }
}

struct Finish {
    ok: bool,
    deliver: Deliver,
}

/// Most closures committed together.
const MAX_BATCH: usize = 128;

/// The storage thread: group commit. It takes every closure waiting (up to [`MAX_BATCH`]),
/// runs each in its own savepoint inside one transaction, commits once (one fsync for the
/// lot), and only then answers each: no caller hears `Ok` before its writes are durable.
fn serve(
    conn: &Connection,
    keyring: &Keyring,
    rx: &mut mpsc::Receiver<Work>,
    checkpoints: &Checkpoints,
    observer: &Observer,
) {
    while let Some(first) = rx.blocking_recv() {
        let started = std::time::Instant::now();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let turn = checkpoints.turn();
        let began = conn.execute_batch("BEGIN IMMEDIATE").map_err(Failed::from);
        let mut finished = Vec::with_capacity(batch.len());
        for work in batch {
            if began.is_err() {
                finished.push((work(None).deliver, None));
                continue;
            }
            let savepoint = conn.execute_batch("SAVEPOINT job");
            let f = work(Some((conn, keyring)));
            let undo = if f.ok { "RELEASE job" } else { "ROLLBACK TO job; RELEASE job" };
            let closed = savepoint.and_then(|()| conn.execute_batch(undo)).err().map(Failed::from);
            finished.push((f.deliver, closed));
        }
        let committed = match began {
            Ok(()) => conn.execute_batch("COMMIT").map_err(Failed::from),
            Err(e) => Err(e),
        };
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        drop(turn);
        if committed.is_ok() {
            checkpoints.committed();
            if let Some(o) = observer.get() {
                o.committed(started.elapsed(), finished.len());
            }
        }
        for (deliver, own_error) in finished {
            deliver(committed.as_ref().err().or(own_error.as_ref()));
        }
    }
}

/// A span for a transaction of a job (inside its span; one outside any — a sweep's — gets none,
/// so that traces hold jobs, not housekeeping).
fn transaction_span(name: &'static str) -> tracing::Span {
    if tracing::Span::current().is_none() {
        tracing::Span::none()
    } else {
        tracing::info_span!(target: "gatehouse::spans", "storage", op = name)
    }
}

/// A closure of [`Store::read`], answering through its own channel.
type Read = Box<dyn FnOnce(&Connection, &Keyring) + Send>;

/// The reader: its own read-only connection and thread, so that reads neither wait for the
/// writer's group commit nor fail with it (a full disk refuses the commit, not a read of
/// what was committed). WAL mode lets it read beside the writer.
fn start_reader(path: &Path, keyring: std::sync::Arc<Keyring>) -> Result<mpsc::Sender<Read>, StorageError> {
    use rusqlite::OpenFlags;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    let (reads, mut rx) = mpsc::channel::<Read>(1024);
    thread::Builder::new()
        .name("gatehouse-storage-read".into())
        .spawn(move || {
            while let Some(read) = rx.blocking_recv() {
                read(&conn, &keyring);
            }
        })
        .map_err(|e| StorageError::Corrupt(format!("cannot start storage reader: {e}")))?;
    Ok(reads)
}

/// Creates `path` readable and writable by its owner only (0600), or makes an existing file
/// so: the database holds sealed values, but also who submitted what and when.
fn private_file(path: &Path) -> Result<(), StorageError> {
    let fail = |e: std::io::Error| StorageError::Corrupt(format!("cannot create {}: {e}", path.display()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        // Never open a file SQLite may hold: closing any descriptor of it would drop the
        // process's POSIX locks on it (SQLite's own among them). Create it only when it is not
        // there yet, before SQLite opens it; otherwise change its mode by path.
        let created = match path.exists() {
            true => false,
            false => match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
                Ok(_) => true,
                // Another worker starting beside this one created it first.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(fail(e)),
            },
        };
        if !created {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        }
    }
    #[cfg(not(unix))]
    let _ = fail;
    Ok(())
}

/// Where the storage is: `[storage] url`.
#[derive(Debug, Clone)]
pub enum Location {
    /// `sqlite:<path>`: the embedded default, for one worker.
    Sqlite(std::path::PathBuf),
    /// `postgres://user@host:port/db`: for several workers.
    Postgres(PostgresConfig),
}

impl Location {
    /// The location `url` names (`sqlite:<path>` or `postgres://…`); `password` is
    /// PostgreSQL's (never part of the url), `pool_size` its most connections.
    ///
    /// # Errors
    /// [`StorageError::Config`] for any other url, or a password in the url.
    pub fn parse(url: &str, password: Option<String>, pool_size: usize) -> Result<Self, StorageError> {
        Self::parse_with_tls(url, password, pool_size, None)
    }

    /// [`Location::parse`], with the CA that signed a PostgreSQL server's certificate
    /// (connections then use TLS).
    ///
    /// # Errors
    /// As [`Location::parse`].
    pub fn parse_with_tls(
        url: &str,
        password: Option<String>,
        pool_size: usize,
        tls_ca: Option<std::path::PathBuf>,
    ) -> Result<Self, StorageError> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err(StorageError::Config(
                    "storage url: sqlite: needs a path (sqlite:worker.sqlite)".into(),
                ));
            }
            return Ok(Self::Sqlite(path.into()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let config: tokio_postgres::Config =
                url.parse().map_err(|e| StorageError::Config(format!("storage url: {e}")))?;
            if config.get_password().is_some() {
                return Err(StorageError::Config(
                    "storage url: a password must not be in the url (it would be logged): use [storage] password_file or WORKER__STORAGE__PASSWORD".into(),
                ));
            }
            return Ok(Self::Postgres(PostgresConfig {
                url: url.to_owned(),
                password,
                pool_size,
                writers: postgres::DEFAULT_WRITERS,
                tls_ca,
            }));
        }
        Err(StorageError::Config(format!(
            "storage url {url:?}: expected sqlite:<path> or postgres://user@host:port/db"
        )))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Self::Postgres(c) => f.write_str(&c.url),
        }
    }
}

/// Handle to the storage: the SQLite thread, or the PostgreSQL pool. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite {
        work: mpsc::Sender<Work>,
        reads: mpsc::Sender<Read>,
        truncate: checkpoint::Truncate,
        observer: Observer,
    },
    Postgres(postgres::PgStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the storage at `location` and migrates it (see [`Store::open_sqlite`]).
    ///
    /// # Errors
    /// When it cannot be reached or opened, or a migration fails.
    pub async fn open(
        location: &Location,
        keyring: Keyring,
        families: &[Family],
    ) -> Result<Self, StorageError> {
        match location {
            Location::Sqlite(path) => Self::open_sqlite(path, keyring, families),
            Location::Postgres(config) => {
                let pg = postgres::PgStore::open(config, keyring, families).await?;
                Ok(Self { backend: Backend::Postgres(pg) })
            }
        }
    }

    /// Whether this is PostgreSQL storage.
    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Opens (creating if needed) the SQLite database at `path` and migrates it: the job
    /// machinery's tables, then each of `families`' own (see [`Family`]). Sealed values are
    /// encrypted with `keyring` (see [`Tx::seal`]).
    ///
    /// # Errors
    /// When the file cannot be opened or a migration fails.
    pub fn open_sqlite(path: &Path, keyring: Keyring, families: &[Family]) -> Result<Self, StorageError> {
        // Workers (or operator commands) that open one new file at once: SQLite may answer
        // "database is locked" to the journal-mode switch without waiting (seen in 5 of 12
        // runs of six threads opening one file); setting up again after a pause succeeds.
        let mut keyring = Some(keyring);
        for attempt in 1.. {
            match Self::open_sqlite_once(path, &mut keyring, families) {
                Err(StorageError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                    if attempt < 50
                        && matches!(
                            e.code,
                            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                        ) =>
                {
                    thread::sleep(std::time::Duration::from_millis(20 * attempt.min(10)));
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    fn open_sqlite_once(
        path: &Path,
        keyring: &mut Option<Keyring>,
        families: &[Family],
    ) -> Result<Self, StorageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StorageError::Corrupt(format!("cannot create {}: {e}", dir.display())))?;
        }
        private_file(path)?;
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let ring = keyring.as_ref().ok_or(StorageError::Closed)?;
        migrations::run(&mut conn, ring)?;
        {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            family::migrate(&Tx::new(&tx, ring), families)?;
            tx.commit()?;
        }
        // SQLite gives its -wal and -shm files the database file's mode; these may predate it.
        for side in ["-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(side);
            if Path::new(&p).exists() {
                private_file(Path::new(&p))?;
            }
        }
        // Not inside a commit: on the checkpoint thread. A rewound log file is reused; one that
        // grew beyond 64 MiB during a long burst is cut back.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        let observer = Observer::default();
        let checkpoints = Checkpoints::start(path, observer.clone())?;
        let truncate = checkpoints.truncate();

        let keyring = std::sync::Arc::new(keyring.take().ok_or(StorageError::Closed)?);
        let reads = start_reader(path, keyring.clone())?;
        let (work, mut rx) = mpsc::channel::<Work>(1024);
        let serving = observer.clone();
        thread::Builder::new()
            .name("gatehouse-storage".into())
            .spawn(move || serve(&conn, &keyring, &mut rx, &checkpoints, &serving))
            .map_err(|e| StorageError::Corrupt(format!("cannot start storage thread: {e}")))?;
        Ok(Self { backend: Backend::Sqlite { work, reads, truncate, observer } })
    }

    /// Sets who is told about commits and checkpoints (once; later calls are ignored).
    pub fn observe(&self, observer: std::sync::Arc<dyn StorageObserver>) {
        let _ = match &self.backend {
            Backend::Sqlite { observer: o, .. } => o.set(observer),
            Backend::Postgres(pg) => pg.observer.set(observer),
        };
    }

    /// Runs `f` atomically: its writes are kept and committed when it returns `Ok` (the answer
    /// comes only after the commit), and undone when it returns `Err` or panics. Closures that
    /// arrive together share one commit (on SQLite see [`serve`]; on PostgreSQL the `batch`
    /// module of `postgres`). On PostgreSQL `f` may run twice — undone, then run again alone,
    /// when a lock it needs was held by another worker — so it must do nothing but its
    /// transaction's work; only its last run counts.
    ///
    /// # Errors
    /// What `f` returns, [`StorageError::Panicked`], or [`StorageError::Commit`] when the
    /// commit failed (nothing of `f` was kept).
    pub async fn transact<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StorageError> + Send + 'static,
        F: Fn(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        use tracing::Instrument as _;
        self.write(None, f).instrument(transaction_span("storage transaction")).await
    }

    /// [`Store::transact`] for a closure whose first statements lock job `probe.id`
    /// ([`Tx::lock_job`]) and probe it ([`Tx::probe_paused`] with `probe.pauses`), as the
    /// decision about a delivery does. On PostgreSQL a batch takes those locks and reads those
    /// probes for all its closures at once, in one round trip, before they run; a closure
    /// whose job another worker has locked runs alone afterwards. A closure that does
    /// otherwise is still correct: what was read ahead is only served while it is true.
    ///
    /// # Errors
    /// As [`Store::transact`].
    pub async fn transact_on<R, E, F>(&self, probe: JobProbe, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StorageError> + Send + 'static,
        F: Fn(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        use tracing::Instrument as _;
        self.write(Some(probe), f).instrument(transaction_span("storage transaction")).await
    }

    async fn write<R, E, F>(&self, probe: Option<JobProbe>, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StorageError> + Send + 'static,
        F: Fn(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        let work = match &self.backend {
            Backend::Sqlite { work, .. } => work,
            Backend::Postgres(pg) => return pg.transact(probe, f).await,
        };
        let (done, result) = oneshot::channel();
        let job: Work = Box::new(move |open| {
            let ran = open.is_some();
            let outcome = match open {
                Some((conn, keyring)) => {
                    let mut tx = Tx::new(conn, keyring);
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut tx)))
                        .unwrap_or_else(|p| Err(StorageError::Panicked(panic_message(&*p)).into()))
                }
                // Answered with the batch's failure (below): never `Ok`.
                None => Err(StorageError::Closed.into()),
            };
            Finish {
                ok: outcome.is_ok(),
                deliver: Box::new(move |failed: Option<&Failed>| {
                    let outcome = match (failed, outcome) {
                        (Some(e), outcome) if !ran || outcome.is_ok() => {
                            Err(StorageError::Commit { message: e.message.clone(), refusal: e.refusal }
                                .into())
                        }
                        (_, outcome) => outcome,
                    };
                    let _ = done.send(outcome);
                }),
            }
        });
        work.send(job).await.map_err(|_| StorageError::Closed)?;
        result.await.map_err(|_| StorageError::Closed)?
    }

    /// Whether storage takes writes again after refusing them: a write that needs room on disk
    /// ([`Tx::probe_write`]). On SQLite the log is first copied back and cut to nothing,
    /// between two of the writer's transactions: it may have grown while no checkpoint could
    /// run, and a write fits in the room its file holds while the disk is still full (measured:
    /// a probe taken, then the next jobs refused again, and the log grown over the room freed).
    ///
    /// # Errors
    /// Why storage still refuses writes (or a reader held the log: try again).
    pub async fn probe_writes(&self) -> Result<(), StorageError> {
        if let Backend::Sqlite { truncate, .. } = &self.backend {
            let truncate = truncate.clone();
            tokio::task::spawn_blocking(move || truncate.now()).await.map_err(|_| StorageError::Closed)??;
        }
        self.transact(|tx| tx.probe_write()).await
    }

    /// Runs `f`, which only reads, in a read-only transaction beside the writer: it sees what
    /// was committed before it began, and answers while the writer waits or storage refuses
    /// writes (a full disk). On SQLite a read-only connection of its own (a write in `f`
    /// fails); on PostgreSQL a pooled connection, as [`Store::transact`].
    ///
    /// # Errors
    /// What `f` returns, or [`StorageError::Panicked`].
    pub async fn read<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StorageError> + Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        use tracing::Instrument as _;
        self.read_only(f).instrument(transaction_span("storage read")).await
    }

    async fn read_only<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StorageError> + Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        let reads = match &self.backend {
            Backend::Sqlite { reads, .. } => reads,
            Backend::Postgres(pg) => return pg.run(f).await,
        };
        let (done, result) = oneshot::channel();
        let read: Read = Box::new(move |conn, keyring| {
            let outcome = match conn.execute_batch("BEGIN") {
                Ok(()) => {
                    let mut tx = Tx::new(conn, keyring);
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut tx)))
                        .unwrap_or_else(|p| Err(StorageError::Panicked(panic_message(&*p)).into()));
                    let _ = conn.execute_batch("ROLLBACK");
                    out
                }
                Err(e) => Err(StorageError::from(e).into()),
            };
            let _ = done.send(outcome);
        });
        reads.send(read).await.map_err(|_| StorageError::Closed)?;
        result.await.map_err(|_| StorageError::Closed)?
    }
}
