//! Typed operations inside one storage transaction. All SQL lives here.

use std::time::{SystemTime, UNIX_EPOCH};

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

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

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

    // ---- jobs ------------------------------------------------------------------------------

    /// The job with this id, whoever owns it.
    pub fn job(&self, id: &JobId) -> Result<Option<StoredJob>, StorageError> {
        let row = self.one(
            "SELECT client, kind, state, result, error, seq_key, seq_number, reason
                 FROM jobs WHERE id = ?1",
            params![id.as_str()],
            |r| {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<String>(1)?,
                    r.get::<String>(2)?,
                    r.get::<Option<String>>(3)?,
                    r.get::<Option<String>>(4)?,
                    r.get::<Option<String>>(5)?,
                    r.get::<Option<i64>>(6)?,
                    r.get::<Option<String>>(7)?,
                ))
            },
        )?;
        let Some((client, kind, state, result, error, key, number, reason)) = row else {
            return Ok(None);
        };
        let state = JobState::parse(&state)
            .ok_or_else(|| StorageError::Corrupt(format!("unknown state {state:?}")))?;
        let result = self.unseal(result, &Place::job_result(id.as_str(), &client))?;
        let error = self.unseal_text(error, &Place::job_error(id.as_str(), &client))?;
        Ok(Some(StoredJob {
            id: id.clone(),
            client,
            kind,
            state,
            result,
            error,
            reason,
            sequence: key.zip(number.map(|n| n as u64)),
        }))
    }

    /// Inserts the job or updates its state and outcome.
    pub fn record_job(&self, job: &StoredJob) -> Result<(), StorageError> {
        let (key, number) = match &job.sequence {
            Some((k, n)) => (Some(k.as_str()), Some(to_i64(*n)?)),
            None => (None, None),
        };
        if job.state.is_final() {
            self.forget_cancelled(&job.id)?;
            self.pass_turns(&job.id)?;
            self.exec("DELETE FROM progress WHERE job_id = ?1", params![job.id.as_str()])?;
            self.exec("DELETE FROM checkpoints WHERE job_id = ?1", params![job.id.as_str()])?;
            self.exec(
                "UPDATE schedules SET running_job = NULL WHERE running_job = ?1",
                params![job.id.as_str()],
            )?;
        }
        self.log_state(&job.id, &job.client, job.state)?;
        let at = Place::job_result(job.id.as_str(), &job.client);
        let result = job.result.as_ref().map(|r| self.seal(r, &at)).transpose()?;
        let error = self.seal_text(job.error.as_deref(), &Place::job_error(job.id.as_str(), &job.client))?;
        self.exec(
            "INSERT INTO jobs (id, client, kind, state, result, error, seq_key, seq_number, updated_at_ms, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(id) DO UPDATE SET state = excluded.state, result = excluded.result,
                 error = excluded.error, reason = excluded.reason,
                 seq_key = excluded.seq_key, seq_number = excluded.seq_number,
                 updated_at_ms = excluded.updated_at_ms",
            params![
                job.id.as_str(),
                job.client,
                job.kind,
                job.state.as_str(),
                result,
                error,
                key,
                number,
                now_ms(),
                job.reason
            ],
        )?;
        Ok(())
    }

    /// For an operator's replay of the job's `dead_count`th dead letter: forgets the job (and
    /// its attempts) if it is dead-lettered and that was its latest dead letter, so that the
    /// replay runs it afresh. A job in any other state is kept as it is (the replay is then
    /// answered from it); a grant for an earlier dead letter is refused (`GrantTooOld`).
    pub fn forget_dead_lettered(&self, id: &JobId, dead_count: u32) -> Result<Forget, StorageError> {
        let dead: Option<String> = self.one(
            "SELECT state FROM jobs WHERE id = ?1 AND state = 'dead_lettered'",
            params![id.as_str()],
            |r| r.get(0),
        )?;
        if dead.is_none() {
            return Ok(Forget::NotDeadLettered);
        }
        if self.dead_count(id)? != dead_count {
            return Ok(Forget::GrantTooOld);
        }
        self.exec("DELETE FROM jobs WHERE id = ?1", params![id.as_str()])?;
        self.exec("DELETE FROM attempts WHERE job_id = ?1", params![id.as_str()])?;
        Ok(Forget::Forgotten)
    }

    /// Counts one more dead letter of job `id`; answers the count (1 for its first).
    pub fn count_dead_letter(&self, id: &JobId) -> Result<u32, StorageError> {
        self.lock_job(id)?;
        let count: i64 = self.must(
            "INSERT INTO dead_letters (job_id, count, at_ms) VALUES (?1, 1, ?2)
             ON CONFLICT(job_id) DO UPDATE SET count = dead_letters.count + 1, at_ms = excluded.at_ms
             RETURNING count",
            params![id.as_str(), now_ms()],
            |r| r.get(0),
        )?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// How many times job `id` was dead-lettered (0: never, or so long ago it was forgotten).
    pub fn dead_count(&self, id: &JobId) -> Result<u32, StorageError> {
        let n: Option<i64> =
            self.one("SELECT count FROM dead_letters WHERE job_id = ?1", params![id.as_str()], |r| r.get(0))?;
        Ok(n.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)))
    }

    /// Forgets the dead-letter counts of jobs last dead-lettered before `before_ms` (their
    /// messages are stale by then): at most `limit`.
    pub fn prune_dead_counts(&self, before_ms: i64, limit: u32) -> Result<u64, StorageError> {
        let n = self.exec(
            "DELETE FROM dead_letters WHERE job_id IN (SELECT job_id FROM dead_letters WHERE at_ms < ?1 ORDER BY at_ms LIMIT ?2)",
            params![before_ms, limit],
        )?;
        Ok(n as u64)
    }

    // ---- attempts --------------------------------------------------------------------------

    /// Counts one more start of `id` and marks it running; answers the new count and whether
    /// the previous start was still marked running (the process died during it). Committed
    /// before the handler runs, so that a crash while running still counts.
    pub fn begin_attempt(&self, id: &JobId, client: &str) -> Result<(u32, bool), StorageError> {
        let interrupted = self.attempts(id)?.is_some_and(|a| a.running);
        let count: i64 = self.must(
            "INSERT INTO attempts (job_id, client, count, running, updated_at_ms) VALUES (?1, ?2, 1, 1, ?3)
             ON CONFLICT(job_id) DO UPDATE SET count = attempts.count + 1, running = 1,
                 updated_at_ms = excluded.updated_at_ms
             RETURNING count",
            params![id.as_str(), client, now_ms()],
            |r| r.get(0),
        )?;
        self.log_state(id, client, JobState::Running)?;
        Ok((u32::try_from(count).unwrap_or(u32::MAX), interrupted))
    }

    /// Counts an attempt that started and failed, in one step (for handlers that run inside
    /// the storage transaction, whose own count was undone with their writes); answers the
    /// count.
    pub fn record_failed_attempt(&self, id: &JobId, client: &str, error: &str) -> Result<u32, StorageError> {
        self.lock_job(id)?;
        let count: i64 = self.must(
            "INSERT INTO attempts (job_id, client, count, running, last_error, updated_at_ms)
             VALUES (?1, ?2, 1, 0, ?3, ?4)
             ON CONFLICT(job_id) DO UPDATE SET count = attempts.count + 1, running = 0,
                 last_error = excluded.last_error, updated_at_ms = excluded.updated_at_ms
             RETURNING count",
            params![
                id.as_str(),
                client,
                self.seal_text(Some(error), &Place::attempt_error(id.as_str(), client))?,
                now_ms()
            ],
            |r| r.get(0),
        )?;
        self.log_state(id, client, JobState::Retrying)?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// Forgets the attempts of a job whose outcome is now recorded.
    pub fn clear_attempts(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM attempts WHERE job_id = ?1", params![id.as_str()])?;
        Ok(())
    }

    /// Records why the latest attempt of `id` failed.
    pub fn fail_attempt(&self, id: &JobId, error: &str) -> Result<(), StorageError> {
        self.lock_job(id)?;
        let Some(a) = self.attempts(id)? else { return Ok(()) };
        let sealed = self.seal_text(Some(error), &Place::attempt_error(id.as_str(), &a.client))?;
        self.exec(
            "UPDATE attempts SET last_error = ?2, running = 0, updated_at_ms = ?3 WHERE job_id = ?1",
            params![id.as_str(), sealed, now_ms()],
        )?;
        self.log_state(id, &a.client, JobState::Retrying)?;
        Ok(())
    }

    pub fn attempts(&self, id: &JobId) -> Result<Option<Attempts>, StorageError> {
        self.one(
            "SELECT client, count, last_error, running FROM attempts WHERE job_id = ?1",
            params![id.as_str()],
            |r| {
                Ok(Attempts {
                    client: r.get(0)?,
                    count: u32::try_from(r.get::<i64>(1)?).unwrap_or(u32::MAX),
                    last_error: r.get(2)?,
                    running: r.get::<i64>(3)? != 0,
                })
            },
        )?
        .map(|mut a| {
            a.last_error =
                self.unseal_text(a.last_error.take(), &Place::attempt_error(id.as_str(), &a.client))?;
            Ok(a)
        })
        .transpose()
    }

    // ---- sequences -------------------------------------------------------------------------

    /// The next number `key` applies (1 for a key never seen).
    pub fn next_expected(&self, key: &str) -> Result<u64, StorageError> {
        let next: Option<i64> =
            self.one("SELECT next FROM sequences WHERE key = ?1", params![key], |r| r.get(0))?;
        Ok(next.map_or(1, |n| n as u64))
    }

    pub fn set_next_expected(&self, key: &str, next: u64) -> Result<(), StorageError> {
        self.exec(
            "INSERT INTO sequences (key, next) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET next = excluded.next",
            params![key, to_i64(next)?],
        )?;
        Ok(())
    }

    /// The job that holds `number` in `key`'s sequence, applied or parked.
    pub fn sequence_holder(&self, key: &str, number: u64) -> Result<Option<JobId>, StorageError> {
        let id: Option<String> = self.one(
            "SELECT id FROM jobs WHERE seq_key = ?1 AND seq_number = ?2",
            params![key, to_i64(number)?],
            |r| r.get(0),
        )?;
        id.as_deref().map(parse_id).transpose()
    }

    /// Keeps a job until its predecessor has applied. Its `jobs` row must exist.
    pub fn park(&self, p: &Parked) -> Result<(), StorageError> {
        self.exec(
            "INSERT INTO parked (seq_key, seq_number, job_id, envelope, reply_to, correlation_id, parked_at_ms,
                 deadline_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                p.seq_key,
                to_i64(p.seq_number)?,
                p.job_id.as_str(),
                p.envelope,
                p.reply_to,
                p.correlation_id,
                now_ms(),
                p.deadline_ms
            ],
        )?;
        Ok(())
    }

    /// Removes and returns the job parked at `number` of `key`, if any.
    pub fn take_parked(&self, key: &str, number: u64) -> Result<Option<Parked>, StorageError> {
        let n = to_i64(number)?;
        let row = self.one(
            &format!("SELECT {PARKED_COLUMNS} FROM parked WHERE seq_key = ?1 AND seq_number = ?2"),
            params![key, n],
            parked_row,
        )?;
        let Some((id, mut parked)) = row else { return Ok(None) };
        self.exec("DELETE FROM parked WHERE seq_key = ?1 AND seq_number = ?2", params![key, n])?;
        parked.job_id = parse_id(&id)?;
        Ok(Some(parked))
    }

    /// Claims parked jobs whose gap deadline passed before `now_ms` (the oldest, at most
    /// `limit`) for the caller to dead-letter: their deadline moves to `claimed_until_ms`, so
    /// that no other worker's sweep takes them meanwhile (and one that dies while dead-lettering
    /// lets them come back then). They stay parked until [`Tx::take_parked`]: the caller
    /// dead-letters first, then takes.
    pub fn claim_expired_parked(
        &self,
        now_ms: i64,
        claimed_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<Parked>, StorageError> {
        let rows = self.rows(
            &format!(
                "UPDATE parked SET deadline_ms = ?2
                 WHERE deadline_ms < ?1 AND (seq_key, seq_number) IN (
                     SELECT seq_key, seq_number FROM parked WHERE deadline_ms < ?1 ORDER BY deadline_ms LIMIT ?3{}
                 ) RETURNING {PARKED_COLUMNS}",
                self.skip_locked()
            ),
            params![now_ms, claimed_until_ms, limit],
        )?;
        let mut out = Vec::new();
        for row in &rows {
            let (id, mut parked) = parked_row(row)?;
            parked.job_id = parse_id(&id)?;
            out.push(parked);
        }
        Ok(out)
    }

    /// How many jobs of `client` wait for a predecessor.
    pub fn parked_count_of(&self, client: &str) -> Result<u64, StorageError> {
        self.count_of(client, "parked h JOIN jobs j ON j.id = h.job_id", "")
    }

    /// How many delayed jobs of `client` are held until due.
    pub fn delayed_count_of(&self, client: &str) -> Result<u64, StorageError> {
        self.count_of(client, "scheduled h JOIN jobs j ON j.id = h.job_id", "AND h.released = 0")
    }

    /// How many jobs of `client` wait for a singleton turn.
    pub fn waiting_count_of(&self, client: &str) -> Result<u64, StorageError> {
        self.count_of(client, "singleton_waiting h JOIN jobs j ON j.id = h.job_id", "")
    }

    /// How many rows of `held` (joined to `jobs j`) are `client`'s, `and` holding too.
    fn count_of(&self, client: &str, held: &str, and: &str) -> Result<u64, StorageError> {
        let sql = format!("SELECT count(*) FROM {held} WHERE j.client = ?1 {and}");
        let n: i64 = self.must(&sql, params![client], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// How many jobs wait for a predecessor.
    pub fn parked_count(&self) -> Result<u64, StorageError> {
        let n: i64 = self.must("SELECT count(*) FROM parked", params![], |r| r.get(0))?;
        Ok(n as u64)
    }

    // ---- delayed jobs ----------------------------------------------------------------------

    /// Keeps the message of delayed job `id` (recorded as `scheduled`) until `due_ms`.
    pub fn schedule(&self, id: &JobId, due_ms: u64, envelope: &[u8]) -> Result<(), StorageError> {
        self.exec(
            "INSERT INTO scheduled (job_id, due_ms, envelope) VALUES (?1, ?2, ?3)",
            params![id.as_str(), to_i64(due_ms)?, envelope],
        )?;
        Ok(())
    }

    /// Claims delayed jobs due at `now_ms` and not yet sent back to their queue (the earliest,
    /// at most `limit`) for the caller to send back, until `claimed_until_ms`: no other worker's
    /// sweep sends them meanwhile; if the caller dies before [`Tx::mark_released`], they are
    /// claimed again after that.
    pub fn claim_due_scheduled(
        &self,
        now_ms: i64,
        claimed_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<(JobId, Vec<u8>)>, StorageError> {
        self.claimed(
            &format!(
                "UPDATE scheduled SET claimed_until_ms = ?2
                 WHERE released = 0 AND due_ms <= ?1 AND claimed_until_ms <= ?1 AND job_id IN (
                     SELECT job_id FROM scheduled WHERE released = 0 AND due_ms <= ?1 AND claimed_until_ms <= ?1
                     ORDER BY due_ms LIMIT ?3{}
                 ) RETURNING job_id, envelope",
                self.skip_locked()
            ),
            now_ms,
            claimed_until_ms,
            limit,
        )
    }

    /// Job ids and messages that the claiming `sql` answers, given a time (`?1`), the claim's
    /// end (`?2`) and a limit (`?3`).
    fn claimed(
        &self,
        sql: &str,
        now_ms: i64,
        claimed_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<(JobId, Vec<u8>)>, StorageError> {
        self.rows(sql, params![now_ms, claimed_until_ms, limit])?
            .iter()
            .map(|r| Ok((parse_id(&r.get::<String>(0)?)?, r.get(1)?)))
            .collect()
    }

    /// Records that the delayed job's message went back to its queue (sent again only if this
    /// is never recorded: a crash in between sends it twice, and the job id dedupes).
    pub fn mark_released(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("UPDATE scheduled SET released = 1 WHERE job_id = ?1", params![id.as_str()])?;
        Ok(())
    }

    /// When delayed job `id` is due, if it is still held.
    pub fn scheduled_due(&self, id: &JobId) -> Result<Option<u64>, StorageError> {
        let due: Option<i64> =
            self.one("SELECT due_ms FROM scheduled WHERE job_id = ?1", params![id.as_str()], |r| r.get(0))?;
        Ok(due.map(|d| d.max(0) as u64))
    }

    /// Forgets that `id` was held (its time came and it runs now): the held message and the
    /// `scheduled` record.
    pub fn unschedule(&self, id: &JobId) -> Result<(), StorageError> {
        if let Some(job) = self.job(id)?.filter(|j| j.state == JobState::Scheduled) {
            self.log_state(id, &job.client, JobState::Queued)?;
        }
        self.exec("DELETE FROM scheduled WHERE job_id = ?1", params![id.as_str()])?;
        self.exec("DELETE FROM jobs WHERE id = ?1 AND state = 'scheduled'", params![id.as_str()])?;
        Ok(())
    }

    /// How many delayed jobs are held.
    pub fn scheduled_count(&self) -> Result<u64, StorageError> {
        let n: i64 = self.must("SELECT count(*) FROM scheduled", params![], |r| r.get(0))?;
        Ok(n as u64)
    }

    // ---- progress and checkpoints ------------------------------------------------------------

    /// Keeps `progress` as the latest of job `id` (of `client`), sealed.
    pub fn set_progress(&self, id: &JobId, client: &str, progress: &Value) -> Result<(), StorageError> {
        self.set_latest("progress", id, client, progress)
    }

    /// The latest progress job `id` of `client` reported, if it runs.
    pub fn progress(&self, id: &JobId, client: &str) -> Result<Option<Value>, StorageError> {
        self.latest("progress", id, client)
    }

    /// Keeps `state` as the checkpoint of job `id` (of `client`), sealed: its next attempt
    /// starts from it. Gone once the job is decided.
    pub fn save_checkpoint(&self, id: &JobId, client: &str, state: &Value) -> Result<(), StorageError> {
        self.set_latest("checkpoints", id, client, state)
    }

    /// The last checkpoint job `id` of `client` saved.
    pub fn checkpoint(&self, id: &JobId, client: &str) -> Result<Option<Value>, StorageError> {
        self.latest("checkpoints", id, client)
    }

    /// One job's latest value in `table` (`progress` or `checkpoints`), sealed.
    fn set_latest(&self, table: &str, id: &JobId, client: &str, value: &Value) -> Result<(), StorageError> {
        let at = Place { table, column: "value", row: id.as_str(), owner: client };
        self.exec(
            &format!(
                "INSERT INTO {} (job_id, client, value, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(job_id) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
                identifier(table)?
            ),
            params![id.as_str(), client, self.seal(value, &at)?, now_ms()],
        )?;
        Ok(())
    }

    fn latest(&self, table: &str, id: &JobId, client: &str) -> Result<Option<Value>, StorageError> {
        let stored = self.one(
            &format!("SELECT value FROM {} WHERE job_id = ?1 AND client = ?2", identifier(table)?),
            params![id.as_str(), client],
            |r| r.get(0),
        )?;
        self.unseal(stored, &Place { table, column: "value", row: id.as_str(), owner: client })
    }

    // ---- event log -------------------------------------------------------------------------------

    /// Appends `state` to the state transitions of job `id` (of `client`), unless it is the
    /// latest already.
    pub fn log_state(&self, id: &JobId, client: &str, state: JobState) -> Result<(), StorageError> {
        let last: Option<(i64, String)> = self.one(
            "SELECT seq, state FROM job_events WHERE job_id = ?1 ORDER BY seq DESC LIMIT 1",
            params![id.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if last.as_ref().is_some_and(|(_, s)| s == state.as_str()) {
            return Ok(());
        }
        self.exec(
            "INSERT INTO job_events (job_id, seq, client, state, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id.as_str(), last.map_or(1, |(n, _)| n + 1), client, state.as_str(), now_ms()],
        )?;
        Ok(())
    }

    /// The state transitions of job `id` of `client` after number `after`, oldest first, at
    /// most `limit`.
    pub fn job_events(
        &self,
        id: &JobId,
        client: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<gatehouse_protocol::JobEvent>, StorageError> {
        let rows = self.rows(
            "SELECT seq, state, at_ms FROM job_events WHERE job_id = ?1 AND client = ?2 AND seq > ?3
             ORDER BY seq LIMIT ?4",
            params![id.as_str(), client, to_i64(after)?, limit],
        )?;
        let mut out = Vec::new();
        for row in &rows {
            let (seq, state, at_ms) = (row.get::<i64>(0)?, row.get::<String>(1)?, row.get::<i64>(2)?);
            let status = JobState::parse(&state).ok_or_else(|| {
                StorageError::Corrupt(format!("job {id}: unknown state {state:?} in its events"))
            })?;
            out.push(gatehouse_protocol::JobEvent {
                seq: seq.max(0) as u64,
                status,
                at_ms: at_ms.max(0) as u64,
            });
        }
        Ok(out)
    }

    // ---- schedules -------------------------------------------------------------------------------

    /// What storage knows of schedule `name`.
    pub fn schedule_state(&self, name: &str) -> Result<Option<ScheduleState>, StorageError> {
        self.one(
            &format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = ?1"),
            params![name],
            schedule_row,
        )
    }

    /// Every schedule storage knows, by name.
    pub fn schedule_states(&self) -> Result<Vec<ScheduleState>, StorageError> {
        self.rows(&format!("SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name"), params![])?
            .iter()
            .map(schedule_row)
            .collect()
    }

    /// Records a schedule's state (after it was planned in this transaction).
    pub fn save_schedule_state(&self, s: &ScheduleState) -> Result<(), StorageError> {
        self.exec(
            "INSERT INTO schedules (name, last_fire_ms, last_job, running_job, running_fire_ms, fired, skipped, missed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(name) DO UPDATE SET last_fire_ms = excluded.last_fire_ms,
                 last_job = excluded.last_job, running_job = excluded.running_job,
                 running_fire_ms = excluded.running_fire_ms, fired = excluded.fired,
                 skipped = excluded.skipped, missed = excluded.missed",
            params![
                s.name,
                s.last_fire_ms,
                s.last_job.as_ref().map(JobId::as_str),
                s.running_job.as_ref().map(JobId::as_str),
                s.running_fire_ms,
                to_i64(s.fired)?,
                to_i64(s.skipped)?,
                to_i64(s.missed)?
            ],
        )?;
        Ok(())
    }

    // ---- leases of long jobs --------------------------------------------------------------------

    /// Holds the message of running job `id` until `expires_at_ms` for `holder` (one attempt;
    /// its delivery is about to be acked). `false` when another attempt holds it already.
    pub fn lease(
        &self,
        id: &JobId,
        envelope: &[u8],
        expires_at_ms: i64,
        holder: &str,
    ) -> Result<bool, StorageError> {
        let n = self.exec(
            "INSERT INTO leases (job_id, envelope, expires_at_ms, holder) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(job_id) DO NOTHING",
            params![id.as_str(), envelope, expires_at_ms, holder],
        )?;
        Ok(n == 1 || self.holds_lease(id, holder)?)
    }

    /// Takes the lease of `id` for `holder` unless another holder's lease is still running at
    /// `now_ms` (a singleton job's turn: one attempt at a time); `false` when it is.
    pub fn lease_turn(
        &self,
        id: &JobId,
        envelope: &[u8],
        expires_at_ms: i64,
        holder: &str,
        now_ms: i64,
    ) -> Result<bool, StorageError> {
        let n = self.exec(
            "INSERT INTO leases (job_id, envelope, expires_at_ms, holder) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(job_id) DO UPDATE SET envelope = excluded.envelope,
                 expires_at_ms = excluded.expires_at_ms, holder = excluded.holder
             WHERE leases.expires_at_ms <= ?5 OR leases.holder = excluded.holder",
            params![id.as_str(), envelope, expires_at_ms, holder, now_ms],
        )?;
        Ok(n == 1)
    }

    /// Extends `holder`'s lease of `id`; `false` when it no longer holds it (it ran out and was
    /// sent back: another attempt may run the job now).
    pub fn renew_lease(&self, id: &JobId, expires_at_ms: i64, holder: &str) -> Result<bool, StorageError> {
        let n = self.exec(
            "UPDATE leases SET expires_at_ms = ?2 WHERE job_id = ?1 AND holder = ?3",
            params![id.as_str(), expires_at_ms, holder],
        )?;
        Ok(n == 1)
    }

    /// Whether `holder` holds the lease of `id` (fences a handed-off attempt's outcome).
    pub fn holds_lease(&self, id: &JobId, holder: &str) -> Result<bool, StorageError> {
        let n: i64 = self.must(
            "SELECT count(*) FROM leases WHERE job_id = ?1 AND holder = ?2",
            params![id.as_str(), holder],
            |r| r.get(0),
        )?;
        Ok(n == 1)
    }

    /// Forgets the lease of `id`: `holder`'s (its attempt ended), or with `None` whoever's (it
    /// ran out and was sent back).
    pub fn end_lease(&self, id: &JobId, holder: Option<&str>) -> Result<(), StorageError> {
        match holder {
            Some(h) => {
                self.exec("DELETE FROM leases WHERE job_id = ?1 AND holder = ?2", params![id.as_str(), h])?
            }
            None => self.exec("DELETE FROM leases WHERE job_id = ?1", params![id.as_str()])?,
        };
        Ok(())
    }

    /// Claims leases not renewed by `now_ms` (their worker died while running them), at most
    /// `limit`, for the caller to send their messages back: each lease is extended to
    /// `claimed_until_ms`, so that no other worker's sweep sends them too.
    pub fn claim_expired_leases(
        &self,
        now_ms: i64,
        claimed_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<(JobId, Vec<u8>)>, StorageError> {
        self.claimed(
            &format!(
                "UPDATE leases SET expires_at_ms = ?2
                 WHERE expires_at_ms <= ?1 AND job_id IN (
                     SELECT job_id FROM leases WHERE expires_at_ms <= ?1 ORDER BY expires_at_ms LIMIT ?3{}
                 ) RETURNING job_id, envelope",
                self.skip_locked()
            ),
            now_ms,
            claimed_until_ms,
            limit,
        )
    }

    // ---- singletons ---------------------------------------------------------------------------

    /// Takes job `id` out of the singleton waiting line (it was refused).
    pub fn stop_waiting(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM singleton_waiting WHERE job_id = ?1", params![id.as_str()])?;
        Ok(())
    }

    /// Takes the turn of singleton `key` for job `id` if it is free (or already `id`'s);
    /// otherwise queues the job's message behind the others waiting and answers `false`.
    pub fn take_turn(&self, key: &str, id: &JobId, envelope: &[u8]) -> Result<bool, StorageError> {
        self.lock(&format!("turn {key}"))?;
        let holder: Option<String> =
            self.one("SELECT job_id FROM singleton_turns WHERE key = ?1", params![key], |r| r.get(0))?;
        match holder {
            Some(h) if h == id.as_str() => Ok(true),
            Some(_) => {
                self.exec(
                    "INSERT INTO singleton_waiting (key, job_id, envelope) VALUES (?1, ?2, ?3)
                     ON CONFLICT(job_id) DO NOTHING",
                    params![key, id.as_str(), envelope],
                )?;
                Ok(false)
            }
            None => {
                self.exec(
                    "INSERT INTO singleton_turns (key, job_id) VALUES (?1, ?2)",
                    params![key, id.as_str()],
                )?;
                Ok(true)
            }
        }
    }

    /// Job `id` is decided: the turns it held pass to the next job waiting for each (its message
    /// goes back to its queue, through the delayed-job sweeper, at once).
    fn pass_turns(&self, id: &JobId) -> Result<(), StorageError> {
        let keys: Vec<String> = self
            .rows("SELECT key FROM singleton_turns WHERE job_id = ?1", params![id.as_str()])?
            .iter()
            .map(|r| r.get(0))
            .collect::<Result<_, _>>()?;
        for key in keys {
            self.lock(&format!("turn {key}"))?;
            let next: Option<(i64, String, Vec<u8>)> = self.one(
                "SELECT seq, job_id, envelope FROM singleton_waiting WHERE key = ?1 ORDER BY seq LIMIT 1",
                params![&key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            match next {
                Some((seq, next, envelope)) => {
                    self.exec("UPDATE singleton_turns SET job_id = ?1 WHERE key = ?2", params![next, key])?;
                    self.exec("DELETE FROM singleton_waiting WHERE seq = ?1", params![seq])?;
                    self.exec(
                        "INSERT INTO scheduled (job_id, due_ms, envelope) VALUES (?1, 0, ?2)
                         ON CONFLICT(job_id) DO UPDATE SET due_ms = 0, released = 0, claimed_until_ms = 0,
                             envelope = excluded.envelope",
                        params![next, envelope],
                    )?;
                }
                None => {
                    self.exec("DELETE FROM singleton_turns WHERE key = ?1", params![&key])?;
                }
            }
        }
        Ok(())
    }

    /// Forgets the message of a singleton job whose turn came (it runs now).
    pub fn turn_taken(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM scheduled WHERE job_id = ?1", params![id.as_str()])?;
        self.exec("DELETE FROM jobs WHERE id = ?1 AND state = 'waiting_for_turn'", params![id.as_str()])?;
        Ok(())
    }

    // ---- cancellation ------------------------------------------------------------------------

    /// Marks `id` cancelled by `client` (again: no change); a delayed job comes due at once, to
    /// be decided `cancelled` in its turn.
    pub fn mark_cancelled(&self, id: &JobId, client: &str) -> Result<(), StorageError> {
        self.exec(
            "INSERT INTO cancelled (job_id, client, at_ms) VALUES (?1, ?2, ?3) ON CONFLICT(job_id) DO NOTHING",
            params![id.as_str(), client, now_ms()],
        )?;
        self.exec(
            "UPDATE scheduled SET due_ms = 0, released = 0, claimed_until_ms = 0 WHERE job_id = ?1",
            params![id.as_str()],
        )?;
        Ok(())
    }

    /// Whether `id` was cancelled (and not yet decided so).
    pub fn is_cancelled(&self, id: &JobId) -> Result<bool, StorageError> {
        Ok(self.one("SELECT 1 FROM cancelled WHERE job_id = ?1", params![id.as_str()], |_| Ok(()))?.is_some())
    }

    /// Forgets the cancellation of a job that is decided now.
    pub fn forget_cancelled(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM cancelled WHERE job_id = ?1", params![id.as_str()])?;
        Ok(())
    }

    /// Deletes at most `limit` cancellations made before `before_ms` whose job never arrived
    /// (its message is stale by then); answers how many.
    pub fn prune_cancelled(&self, before_ms: i64, limit: u32) -> Result<u64, StorageError> {
        let n = self.exec(
            "DELETE FROM cancelled WHERE job_id IN (SELECT job_id FROM cancelled WHERE at_ms < ?1 ORDER BY at_ms LIMIT ?2)",
            params![before_ms, limit],
        )?;
        Ok(n as u64)
    }

    // ---- retention -------------------------------------------------------------------------

    /// The kinds that have decided jobs, in name order (one index seek per kind).
    pub fn decided_kinds(&self) -> Result<Vec<String>, StorageError> {
        let kinds = self
            .rows(
                &format!(
                    "WITH RECURSIVE k(kind) AS (
                         SELECT (SELECT min(kind) FROM jobs WHERE {DECIDED})
                         UNION ALL
                         SELECT (SELECT min(kind) FROM jobs WHERE {DECIDED} AND kind > k.kind) FROM k
                         WHERE k.kind IS NOT NULL)
                     SELECT kind FROM k WHERE kind IS NOT NULL"
                ),
                params![],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect::<Result<_, _>>()?;
        Ok(kinds)
    }

    /// Deletes at most `limit` jobs of `kind` decided (succeeded, failed or dead-lettered)
    /// before `before_ms`, oldest first; answers how many. Their sequence numbers stay used (the
    /// key's next number is past them), and a message of a pruned job can no longer arrive
    /// (retention is at least the worker's `max_message_age_s`).
    pub fn prune_decided(&self, kind: &str, before_ms: i64, limit: u32) -> Result<u64, StorageError> {
        let n = self.exec(
            &format!(
                "DELETE FROM jobs WHERE id IN (
                     SELECT id FROM jobs WHERE {DECIDED} AND kind = ?1 AND updated_at_ms < ?2
                     ORDER BY updated_at_ms LIMIT ?3)"
            ),
            params![kind, before_ms, limit],
        )?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
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
        let err = store
            .transact(|tx| tx.record_job(&job(2, JobState::Succeeded, Some(("k", 1)))))
            .await
            .unwrap_err();
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
            migrations: &[
                NOTES.migrations[0],
                "ALTER TABLE notes ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0",
            ],
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
        assert_eq!(n, (1, false));
        store.transact(|tx| tx.fail_attempt(&id(4), "boom")).await.unwrap();
        let n = store.transact(|tx| tx.begin_attempt(&id(4), "c")).await.unwrap();
        assert_eq!(n, (2, false));
        let a = store.transact(|tx| tx.attempts(&id(4))).await.unwrap().unwrap();
        assert_eq!((a.count, a.last_error.as_deref(), a.running), (2, Some("boom"), true));
        // Started again without finishing or failing: the previous start was interrupted.
        let n = store.transact(|tx| tx.begin_attempt(&id(4), "c")).await.unwrap();
        assert_eq!(n, (3, true));
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
}
