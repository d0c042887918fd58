//! Typed operations inside one storage transaction. All SQL lives here: this module holds the
//! transaction itself (statements, locks, the families' access), and one file per group of
//! tables that belong together holds their operations and their tests: `jobs` (and the event
//! log), `attempts` (progress, checkpoints), `sequences` (and parked jobs), `held` (delayed
//! jobs, leases, singleton turns), `pauses` (paused kinds and classes, and their held jobs),
//! `schedules`, `cancellation`, `retention`, `sealing` (at rest, rekeying), `batches` (and
//! workflows), `parents` (jobs waiting for others).

mod attempts;
mod batches;
mod cancellation;
mod held;
mod jobs;
mod parents;
mod pauses;
mod retention;
mod schedules;
mod sealing;
mod sequences;

pub use batches::Member;
pub use held::SENT_BACK;
pub(crate) use jobs::probe_sql;
pub use jobs::{JobFilter, ListedJob};
pub use pauses::Pause;
pub use sealing::{Place, sealed_aad};

use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::crypto::Keyring;
use gatehouse_protocol::{JobId, JobState};
use rusqlite::Connection;
use serde_json::Value;

use crate::StorageError;
use crate::postgres::Session;
use crate::sql::{Params, Row, params, sqlite_params, sqlite_row};

/// The operations of one [`crate::Store::transact`] closure.
pub struct Tx<'c> {
    conn: Conn<'c>,
    keyring: &'c Keyring,
}

/// The backend a transaction runs on.
enum Conn<'c> {
    /// Inside the savepoint the storage thread opened.
    Sqlite(&'c Connection),
    /// Inside a transaction on a pooled connection.
    Postgres(&'c Session<'c>),
}

/// A job as storage knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    pub id: JobId,
    pub client: String,
    pub kind: String,
    pub state: JobState,
    pub result: Option<Value>,
    pub error: Option<String>,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    pub sequence: Option<(String, u64)>,
    /// When the gatekeeper accepted it (unix ms), as the job's first record keeps it (later
    /// records never change it); `None` when not known (read back, or from before).
    pub submitted_at_ms: Option<i64>,
}

/// A job waiting for its predecessor in a sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    pub job_id: JobId,
    pub seq_key: String,
    pub seq_number: u64,
    /// The message body as it arrived (sealed, with what vouches for it), to run the job
    /// when its turn comes.
    pub envelope: Vec<u8>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// Unix ms after which the job stops waiting and is dead-lettered.
    pub deadline_ms: i64,
}

/// What [`Tx::forget_dead_lettered`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forget {
    /// It was dead-lettered before the grant: forgotten, to run afresh.
    Forgotten,
    /// It is not dead-lettered (decided, pending, or unknown): nothing changed.
    NotDeadLettered,
    /// It was dead-lettered after the grant was issued: nothing changed; refuse the replay.
    GrantTooOld,
}

/// How often a job was started, and how the last try failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempts {
    pub client: String,
    pub count: u32,
    pub last_error: Option<String>,
    /// Started and neither finished nor failed: running now, or interrupted by a crash.
    pub running: bool,
}

/// What storage knows of a job when a delivery of it arrives, read in one statement
/// ([`Tx::probe`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Probe {
    /// Its record (decided, or held: parked, scheduled, waiting).
    pub job: Option<StoredJob>,
    /// Its attempts so far (an external handler's, or a storage handler's failed ones).
    pub attempts: Option<Attempts>,
    /// Whether its client cancelled it.
    pub cancelled: bool,
    /// The pause in force for it (its kind's or its queue class's), when asked.
    pub paused: Option<String>,
}

impl Probe {
    /// Nothing is stored of the job yet: no record, no attempt, no cancellation.
    pub fn is_fresh(&self) -> bool {
        self.job.is_none() && self.attempts.is_none() && !self.cancelled
    }
}

/// The states after which nothing more happens to a job; the condition of the `jobs_decided`
/// index (the query must say it the same way for the index to serve it).
const DECIDED: &str = "state IN ('succeeded', 'failed', 'dead_lettered', 'cancelled')";

/// The name of job `id`'s lock ([`Tx::lock_job`]; the batch read stage takes the same).
pub(crate) fn job_lock(id: &str) -> String {
    format!("job {id}")
}

fn to_i64(n: u64) -> Result<i64, StorageError> {
    i64::try_from(n).map_err(|_| StorageError::Corrupt(format!("number {n} out of range")))
}

/// A name spliced into SQL (from the `sealed_columns` registry): letters, digits and `_`
/// only, or the empty-owner literal `''`.
fn identifier(s: &str) -> Result<&str, StorageError> {
    let ok = s == "''" || (!s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    if ok { Ok(s) } else { Err(StorageError::Corrupt(format!("{s:?} is not a column name"))) }
}

const SCHEDULE_COLUMNS: &str =
    "name, last_fire_ms, last_job, running_job, running_fire_ms, fired, skipped, missed";

fn schedule_row(r: &Row) -> Result<ScheduleState, StorageError> {
    let id = |s: Option<String>| s.and_then(|s| JobId::parse(&s).ok());
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(ScheduleState {
        name: r.get(0)?,
        last_fire_ms: r.get(1)?,
        last_job: id(r.get(2)?),
        running_job: id(r.get(3)?),
        running_fire_ms: r.get(4)?,
        fired: count(r.get(5)?),
        skipped: count(r.get(6)?),
        missed: count(r.get(7)?),
    })
}

/// A schedule's record: its last firing time (unix ms; firings up to it are dealt with), the
/// job of its latest firing, that job again while it runs (cleared when it is decided), and
/// how many firings ran, were skipped (the previous one still ran) or were missed (no worker
/// ran at their time, and the schedule's catch-up policy let them go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleState {
    pub name: String,
    pub last_fire_ms: i64,
    pub last_job: Option<JobId>,
    pub running_job: Option<JobId>,
    pub running_fire_ms: Option<i64>,
    pub fired: u64,
    pub skipped: u64,
    pub missed: u64,
}

const PARKED_COLUMNS: &str = "job_id, seq_key, seq_number, envelope, reply_to, correlation_id, deadline_ms";

/// A `parked` row as (job id text, the rest); the id is parsed by the caller.
fn parked_row(r: &Row) -> Result<(String, Parked), StorageError> {
    Ok((
        r.get(0)?,
        Parked {
            job_id: JobId::from_bytes([0; 16]),
            seq_key: r.get(1)?,
            seq_number: r.get::<i64>(2)? as u64,
            envelope: r.get(3)?,
            reply_to: r.get(4)?,
            correlation_id: r.get(5)?,
            deadline_ms: r.get(6)?,
        },
    ))
}

fn parse_id(s: &str) -> Result<JobId, StorageError> {
    JobId::parse(s).map_err(|_| StorageError::Corrupt(format!("bad job id {s:?}")))
}

fn parse_json(s: Option<String>) -> Result<Option<Value>, StorageError> {
    s.map(|s| serde_json::from_str(&s).map_err(|e| StorageError::Corrupt(e.to_string()))).transpose()
}

impl<'c> Tx<'c> {
    /// Operations on SQLite's `conn`, inside the savepoint the storage thread opened.
    pub(crate) fn new(conn: &'c Connection, keyring: &'c Keyring) -> Self {
        Self { conn: Conn::Sqlite(conn), keyring }
    }

    /// Operations inside a PostgreSQL transaction.
    pub(crate) fn postgres(session: &'c Session<'c>, keyring: &'c Keyring) -> Self {
        Self { conn: Conn::Postgres(session), keyring }
    }

    /// Serializes this transaction with every other about job `id` (see [`Tx::lock`]). Take
    /// locks in this order: a sequence key, then a job, then a singleton key.
    ///
    /// # Errors
    /// A storage failure.
    pub fn lock_job(&self, id: &JobId) -> Result<(), StorageError> {
        self.lock(&job_lock(id.as_str()))
    }

    /// Serializes this transaction with every other about sequence key `key` (see
    /// [`Tx::lock_job`] for the order).
    ///
    /// # Errors
    /// A storage failure.
    pub fn lock_sequence(&self, key: &str) -> Result<(), StorageError> {
        self.lock(&format!("sequence {key}"))
    }

    /// For a claim's subquery: on PostgreSQL, rows another sweep is claiming right now are
    /// passed over (`FOR UPDATE SKIP LOCKED`) rather than waited for; SQLite has one writer.
    fn skip_locked(&self) -> &'static str {
        if self.is_postgres() { " FOR UPDATE SKIP LOCKED" } else { "" }
    }

    /// Whether this is a PostgreSQL transaction (several workers may run beside it).
    pub fn is_postgres(&self) -> bool {
        matches!(self.conn, Conn::Postgres(_))
    }

    /// Runs one statement (prepared once per connection, then cached); answers the rows it
    /// changed.
    pub(crate) fn exec(&self, sql: &str, params: Params<'_>) -> Result<usize, StorageError> {
        match &self.conn {
            Conn::Sqlite(c) => {
                Ok(c.prepare_cached(sql)?.execute(rusqlite::params_from_iter(sqlite_params(params)))?)
            }
            Conn::Postgres(s) => s.exec(sql, params),
        }
    }

    /// A write whose answer (how many rows) nothing reads — also a handler family's (see
    /// [`Tx::execute`]): on PostgreSQL it is sent with the next statement, pipelined (at the
    /// latest with `COMMIT`), which runs it first; an error it meets fails that statement, so
    /// the transaction all the same. A job whose statements are all writes after its probe
    /// waits for no round trip of its own in a batch (see [`crate::Store::transact_on`]).
    ///
    /// # Errors
    /// What sealing or the database answers (on PostgreSQL, a later statement's error).
    pub fn write(&self, sql: &str, params: Params<'_>) -> Result<(), StorageError> {
        match &self.conn {
            Conn::Sqlite(_) => self.exec(sql, params).map(drop),
            Conn::Postgres(s) => s.write(sql, params),
        }
    }

    /// Every row a query answers (prepared once per connection, then cached).
    pub(crate) fn rows(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StorageError> {
        match &self.conn {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let rows = stmt.query_map(rusqlite::params_from_iter(sqlite_params(params)), sqlite_row)?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
            Conn::Postgres(s) => s.rows(sql, params),
        }
    }

    /// The first row a query answers, read by `f`; `None` when there is none.
    pub(crate) fn one<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        f: impl FnOnce(&Row) -> Result<T, StorageError>,
    ) -> Result<Option<T>, StorageError> {
        let row = match &self.conn {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(sqlite_params(params)))?;
                rows.next()?.map(sqlite_row).transpose()?
            }
            Conn::Postgres(s) => s.rows(sql, params)?.into_iter().next(),
        };
        row.as_ref().map(f).transpose()
    }

    /// The row a query always answers (a count, a `RETURNING`), read by `f`.
    fn must<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        f: impl FnOnce(&Row) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        self.one(sql, params, f)?.ok_or_else(|| StorageError::Corrupt(format!("no row answered {sql:?}")))
    }

    /// Runs statements (a migration), not prepared, without parameters.
    pub(crate) fn batch(&self, sql: &str) -> Result<(), StorageError> {
        match &self.conn {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Postgres(s) => s.batch(sql),
        }
    }

    /// Serializes this transaction with every other that takes the lock `name`, until it ends:
    /// on PostgreSQL a transaction-scoped advisory lock (several workers share the database);
    /// on SQLite nothing, as one writer at a time is all there is. In a transaction several
    /// closures share, the lock is only tried: when another transaction holds it, the next
    /// statement fails and the closure runs again alone, where it waits (see
    /// [`crate::Store::transact`]).
    ///
    /// # Errors
    /// A storage failure.
    pub fn lock(&self, name: &str) -> Result<(), StorageError> {
        if let Conn::Postgres(s) = &self.conn {
            // Taken with the next statement, before it runs (see `postgres::Session`).
            s.lock(name);
        }
        Ok(())
    }

    /// A write that needs room on disk: rewrites the one row of `storage_probe` with 1 MiB
    /// that does not compress (a few KiB freed by a failed commit would let a small probe
    /// through while the jobs' writes still fail). It succeeds only when storage takes writes again (see
    /// [`crate::StorageError::refusal`]).
    ///
    /// # Errors
    /// Why storage refuses it.
    pub fn probe_write(&self) -> Result<(), StorageError> {
        let mut x = now_ms().unsigned_abs() | 1;
        let pad: Vec<u8> = (0..1024 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        self.exec(
            "INSERT INTO storage_probe (id, at_ms, pad) VALUES (1, ?1, ?2)
             ON CONFLICT(id) DO UPDATE SET at_ms = excluded.at_ms, pad = excluded.pad",
            params![now_ms(), pad],
        )?;
        Ok(())
    }

    // ---- for handler families ---------------------------------------------------------------

    /// Runs one SQL statement of a handler family (its own tables; see [`crate::Family`]);
    /// answers the rows it changed. Write `?1`, `?2`… for parameters (`params![a, b]`), in the
    /// SQL both backends speak. Prepared once per connection, then cached.
    ///
    /// # Errors
    /// What the database answers.
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<usize, StorageError> {
        self.exec(sql, params)
    }

    /// The first row a family's query answers, read by `f`; `None` when there is none.
    ///
    /// # Errors
    /// What the database answers, or what `f` does.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        f: impl FnOnce(&Row) -> Result<T, StorageError>,
    ) -> Result<Option<T>, StorageError> {
        self.one(sql, params, f)
    }

    /// Every row a family's query answers.
    ///
    /// # Errors
    /// What the database answers.
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StorageError> {
        self.rows(sql, params)
    }
}

#[cfg(test)]
pub(crate) mod tests;
