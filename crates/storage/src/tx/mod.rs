//! Typed operations inside one storage transaction. All SQL lives here: this module holds the
//! transaction itself (statements, sealing, the families' access), and one file per table or
//! concern holds its operations (`jobs`, `attempts`, `sequences`, `delays`, `progress`,
//! `events`, `schedules`, `leases`, `singletons`, `cancellation`, `retention`).

mod attempts;
mod cancellation;
mod delays;
mod events;
mod jobs;
mod leases;
mod progress;
mod retention;
mod schedules;
mod sequences;
mod singletons;

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
    Postgres(Session<'c>),
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

/// The states after which nothing more happens to a job; the condition of the `jobs_decided`
/// index (the query must say it the same way for the index to serve it).
const DECIDED: &str = "state IN ('succeeded', 'failed', 'dead_lettered', 'cancelled')";

fn to_i64(n: u64) -> Result<i64, StorageError> {
    i64::try_from(n).map_err(|_| StorageError::Corrupt(format!("number {n} out of range")))
}

/// Where a sealed value lives: bound into its encryption, so that a writer of the database
/// file cannot move it to another row, column or owner and have the worker read it there.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub table: &'a str,
    pub column: &'a str,
    /// The row's key.
    pub row: &'a str,
    /// Whose it is; empty when the row's key names its owner.
    pub owner: &'a str,
}

/// The associated data a sealed value is bound to (for tools that read the file directly).
pub fn sealed_aad(table: &str, column: &str, row: &str, owner: &str) -> Vec<u8> {
    ["gatehouse at rest v2", table, column, row, owner].join("\0").into_bytes()
}

impl<'a> Place<'a> {
    fn aad(&self) -> Vec<u8> {
        sealed_aad(self.table, self.column, self.row, self.owner)
    }

    fn job_result(id: &'a str, client: &'a str) -> Self {
        Self { table: "jobs", column: "result", row: id, owner: client }
    }

    fn job_error(id: &'a str, client: &'a str) -> Self {
        Self { table: "jobs", column: "error", row: id, owner: client }
    }

    fn attempt_error(id: &'a str, client: &'a str) -> Self {
        Self { table: "attempts", column: "last_error", row: id, owner: client }
    }
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
    pub(crate) fn postgres(session: Session<'c>, keyring: &'c Keyring) -> Self {
        Self { conn: Conn::Postgres(session), keyring }
    }

    /// Serializes this transaction with every other about job `id` (see [`Tx::lock`]). Take
    /// locks in this order: a sequence key, then a job, then a singleton key.
    ///
    /// # Errors
    /// A storage failure.
    pub fn lock_job(&self, id: &JobId) -> Result<(), StorageError> {
        self.lock(&format!("job {id}"))
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
    /// on SQLite nothing, as one writer at a time is all there is.
    ///
    /// # Errors
    /// A storage failure.
    pub fn lock(&self, name: &str) -> Result<(), StorageError> {
        if let Conn::Postgres(s) = &self.conn {
            s.exec("SELECT pg_advisory_xact_lock(hashtextextended(?1, 0))", params![name])?;
        }
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

    /// `value` encrypted under the active data key, bound to its place (`at`): it cannot be
    /// moved to another row, column or owner. Declare the column in the family's
    /// [`crate::Family::sealed`], so that `gatehouse rekey` re-encrypts it.
    ///
    /// # Errors
    /// [`StorageError::Crypto`] when the keyring cannot encrypt.
    pub fn seal(&self, value: &Value, at: &Place<'_>) -> Result<String, StorageError> {
        self.keyring
            .encrypt(value.to_string().as_bytes(), &at.aad())
            .map_err(|e| StorageError::Crypto(e.to_string()))
    }

    /// An error text sealed at `at` (it can quote the payload: an executable's stderr line).
    fn seal_text(&self, text: Option<&str>, at: &Place<'_>) -> Result<Option<String>, StorageError> {
        text.map(|t| self.seal(&Value::String(t.to_owned()), at)).transpose()
    }

    /// An error text stored at `at`, decrypted.
    fn unseal_text(&self, stored: Option<String>, at: &Place<'_>) -> Result<Option<String>, StorageError> {
        Ok(self.unseal(stored, at)?.map(|v| match v {
            Value::String(s) => s,
            other => other.to_string(),
        }))
    }

    /// Seals the error texts earlier releases stored in the clear (schema step 19 on SQLite,
    /// 2 on PostgreSQL); answers how many.
    ///
    /// # Errors
    /// What the database answers.
    pub(crate) fn seal_plaintext_errors(&self) -> Result<u64, StorageError> {
        let mut sealed = 0;
        for (table, key, owner, column) in
            [("jobs", "id", "client", "error"), ("attempts", "job_id", "client", "last_error")]
        {
            let rows: Vec<(String, String, String)> = self
                .rows(
                    &format!("SELECT {key}, {owner}, {column} FROM {table} WHERE {column} IS NOT NULL"),
                    params![],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .collect::<Result<_, StorageError>>()?;
            for (row, owner, text) in rows {
                if Keyring::version(&text).is_some() {
                    continue;
                }
                let at = Place { table, column, row: &row, owner: &owner };
                self.exec(
                    &format!("UPDATE {table} SET {column} = ?1 WHERE {key} = ?2"),
                    params![self.seal(&Value::String(text), &at)?, row],
                )?;
                sealed += 1;
            }
        }
        Ok(sealed)
    }

    /// The value stored at `at`, decrypted. Anything not sealed as this release seals — a
    /// plaintext value, or an earlier release's format bound to its row only — is refused: it
    /// can only have been written into the file behind the worker's back (earlier releases'
    /// values were re-sealed by migration 8).
    ///
    /// # Errors
    /// [`StorageError::Crypto`] for a value that is not sealed, or not for this place or under
    /// a key of the keyring; [`StorageError::Corrupt`] when it does not hold JSON.
    pub fn unseal(&self, stored: Option<String>, at: &Place<'_>) -> Result<Option<Value>, StorageError> {
        let Some(stored) = stored else { return Ok(None) };
        if Keyring::version(&stored) != Some(2) {
            return Err(StorageError::Crypto(format!(
                "{}.{} of {:?} is not sealed: refused",
                at.table, at.column, at.row
            )));
        }
        let plain =
            self.keyring.decrypt(&stored, &at.aad()).map_err(|e| StorageError::Crypto(e.to_string()))?;
        serde_json::from_slice(&plain).map(Some).map_err(|e| StorageError::Corrupt(e.to_string()))
    }

    /// Re-seals the values of `columns` (table, key, owner expression, column): every one not
    /// under the active data key (`gatehouse rekey`), or with `legacy_only` just those an
    /// earlier release wrote (plaintext, or bound to their row only; migration 8). Answers how
    /// many it changed.
    pub(crate) fn reseal(
        &self,
        columns: &[(String, String, String, String)],
        legacy_only: bool,
    ) -> Result<u64, StorageError> {
        let active = self.keyring.active_id().to_owned();
        let mut changed = 0;
        for (table, key, owner, column) in columns {
            let (table, key, owner, column) =
                (identifier(table)?, identifier(key)?, identifier(owner)?, identifier(column)?);
            let rows: Vec<(String, String, String)> = self
                .rows(
                    &format!("SELECT {key}, {owner}, {column} FROM {table} WHERE {column} IS NOT NULL"),
                    params![],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .collect::<Result<_, StorageError>>()?;
            for (row, owner, stored) in rows {
                let at = Place { table, column, row: &row, owner: &owner };
                let value = match Keyring::version(&stored) {
                    Some(2) if legacy_only || Keyring::key_of(&stored) == Some(active.as_str()) => continue,
                    Some(2) => self.unseal(Some(stored), &at)?,
                    // Bound to the row id alone by earlier releases.
                    Some(_) => Some(
                        self.keyring
                            .decrypt(&stored, row.as_bytes())
                            .map_err(|e| StorageError::Crypto(e.to_string()))
                            .and_then(|p| {
                                serde_json::from_slice(&p).map_err(|e| StorageError::Corrupt(e.to_string()))
                            })?,
                    ),
                    None => parse_json(Some(stored))?,
                };
                let Some(value) = value else { continue };
                self.exec(
                    &format!("UPDATE {table} SET {column} = ?1 WHERE {key} = ?2"),
                    params![self.seal(&value, &at)?, row],
                )?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Re-encrypts every sealed value that is not under the active data key — job results and
    /// every column a handler family declared — and answers how many it changed.
    ///
    /// # Errors
    /// A value that does not open, or a storage failure (nothing is changed then).
    pub fn rekey(&self) -> Result<u64, StorageError> {
        self.reseal(&crate::family::sealed_columns(self)?, false)
    }
}

#[cfg(test)]
mod tests;
