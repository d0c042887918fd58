//! Typed operations inside one storage transaction. All SQL lives here.

use std::time::{SystemTime, UNIX_EPOCH};

use gatehouse_protocol::crypto::Keyring;
use gatehouse_protocol::{JobId, JobState};
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use crate::StorageError;

/// The operations of one [`crate::Store::transact`] closure.
pub struct Tx<'c> {
    tx: &'c Connection,
    keyring: &'c Keyring,
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

/// How often a job was started, and how the last try failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempts {
    pub client: String,
    pub count: u32,
    pub last_error: Option<String>,
    /// Started and neither finished nor failed: running now, or interrupted by a crash.
    pub running: bool,
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn to_i64(n: u64) -> Result<i64, StorageError> {
    i64::try_from(n).map_err(|_| StorageError::Corrupt(format!("number {n} out of range")))
}

const PARKED_COLUMNS: &str = "job_id, seq_key, seq_number, envelope, reply_to, correlation_id, deadline_ms";

/// A `parked` row as (job id text, the rest); the id is parsed by the caller.
fn parked_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, Parked)> {
    Ok((
        r.get(0)?,
        Parked {
            job_id: JobId::from_bytes([0; 16]),
            seq_key: r.get(1)?,
            seq_number: r.get::<_, i64>(2)? as u64,
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
    /// Operations on `conn`, inside the savepoint the storage thread opened.
    pub(crate) fn new(conn: &'c Connection, keyring: &'c Keyring) -> Self {
        Self { tx: conn, keyring }
    }

    /// Runs one statement (prepared once per connection, then cached).
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.tx.prepare_cached(sql)?.execute(params)
    }

    /// The one row a query answers (prepared once per connection, then cached).
    fn one<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.tx.prepare_cached(sql)?.query_row(params, f)
    }

    /// `value` encrypted under the active data key, bound to `row` (so it cannot be moved).
    fn seal(&self, value: &Value, row: &str) -> Result<String, StorageError> {
        self.keyring
            .encrypt(value.to_string().as_bytes(), row.as_bytes())
            .map_err(|e| StorageError::Crypto(e.to_string()))
    }

    /// The value stored for `row`: decrypted, or as it is if it predates encryption.
    fn unseal(&self, stored: Option<String>, row: &str) -> Result<Option<Value>, StorageError> {
        let Some(stored) = stored else { return Ok(None) };
        if !Keyring::is_encrypted(&stored) {
            return parse_json(Some(stored));
        }
        let plain =
            self.keyring.decrypt(&stored, row.as_bytes()).map_err(|e| StorageError::Crypto(e.to_string()))?;
        serde_json::from_slice(&plain).map(Some).map_err(|e| StorageError::Corrupt(e.to_string()))
    }

    /// Re-encrypts every vault record and job result that is not under the active data key
    /// (including plaintext from before encryption); answers how many it changed.
    pub fn rekey(&self) -> Result<u64, StorageError> {
        let active = self.keyring.active_id().to_owned();
        let mut changed = 0;
        for (table, key_col, value_col) in [("vault", "token", "record"), ("jobs", "id", "result")] {
            let rows: Vec<(String, String)> = {
                let mut stmt = self.tx.prepare_cached(&format!(
                    "SELECT {key_col}, {value_col} FROM {table} WHERE {value_col} IS NOT NULL"
                ))?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            for (row, stored) in rows {
                if Keyring::key_of(&stored) == Some(active.as_str()) && Keyring::is_encrypted(&stored) {
                    continue;
                }
                let Some(value) = self.unseal(Some(stored), &row)? else { continue };
                let sealed = self.seal(&value, &row)?;
                self.exec(
                    &format!("UPDATE {table} SET {value_col} = ?1 WHERE {key_col} = ?2"),
                    params![sealed, row],
                )?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    // ---- jobs ------------------------------------------------------------------------------

    /// The job with this id, whoever owns it.
    pub fn job(&self, id: &JobId) -> Result<Option<StoredJob>, StorageError> {
        let row = self
            .one(
                "SELECT client, kind, state, result, error, seq_key, seq_number, reason
                 FROM jobs WHERE id = ?1",
                [id.as_str()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                        r.get::<_, Option<String>>(7)?,
                    ))
                },
            )
            .optional()?;
        let Some((client, kind, state, result, error, key, number, reason)) = row else {
            return Ok(None);
        };
        let state = JobState::parse(&state)
            .ok_or_else(|| StorageError::Corrupt(format!("unknown state {state:?}")))?;
        Ok(Some(StoredJob {
            id: id.clone(),
            client,
            kind,
            state,
            result: self.unseal(result, id.as_str())?,
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
        let result = job.result.as_ref().map(|r| self.seal(r, job.id.as_str())).transpose()?;
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
                job.error,
                key,
                number,
                now_ms(),
                job.reason
            ],
        )?;
        Ok(())
    }

    /// Forgets a dead-lettered job, so that a replay runs it afresh. Other jobs are kept.
    pub fn forget_dead_lettered(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM jobs WHERE id = ?1 AND state = 'dead_lettered'", [id.as_str()])?;
        self.exec("DELETE FROM attempts WHERE job_id = ?1", [id.as_str()])?;
        Ok(())
    }

    // ---- attempts --------------------------------------------------------------------------

    /// Counts one more start of `id` and marks it running; answers the new count and whether
    /// the previous start was still marked running (the process died during it). Committed
    /// before the handler runs, so that a crash while running still counts.
    pub fn begin_attempt(&self, id: &JobId, client: &str) -> Result<(u32, bool), StorageError> {
        let interrupted = self.attempts(id)?.is_some_and(|a| a.running);
        let count: i64 = self.one(
            "INSERT INTO attempts (job_id, client, count, running, updated_at_ms) VALUES (?1, ?2, 1, 1, ?3)
             ON CONFLICT(job_id) DO UPDATE SET count = count + 1, running = 1,
                 updated_at_ms = excluded.updated_at_ms
             RETURNING count",
            params![id.as_str(), client, now_ms()],
            |r| r.get(0),
        )?;
        Ok((u32::try_from(count).unwrap_or(u32::MAX), interrupted))
    }

    /// Counts an attempt that started and failed, in one step (for handlers that run inside
    /// the storage transaction, whose own count was undone with their writes); answers the
    /// count.
    pub fn record_failed_attempt(&self, id: &JobId, client: &str, error: &str) -> Result<u32, StorageError> {
        let count: i64 = self.one(
            "INSERT INTO attempts (job_id, client, count, running, last_error, updated_at_ms)
             VALUES (?1, ?2, 1, 0, ?3, ?4)
             ON CONFLICT(job_id) DO UPDATE SET count = count + 1, running = 0,
                 last_error = excluded.last_error, updated_at_ms = excluded.updated_at_ms
             RETURNING count",
            params![id.as_str(), client, error, now_ms()],
            |r| r.get(0),
        )?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// Forgets the attempts of a job whose outcome is now recorded.
    pub fn clear_attempts(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM attempts WHERE job_id = ?1", [id.as_str()])?;
        Ok(())
    }

    /// Records why the latest attempt of `id` failed.
    pub fn fail_attempt(&self, id: &JobId, error: &str) -> Result<(), StorageError> {
        self.exec(
            "UPDATE attempts SET last_error = ?2, running = 0, updated_at_ms = ?3 WHERE job_id = ?1",
            params![id.as_str(), error, now_ms()],
        )?;
        Ok(())
    }

    pub fn attempts(&self, id: &JobId) -> Result<Option<Attempts>, StorageError> {
        Ok(self
            .one(
                "SELECT client, count, last_error, running FROM attempts WHERE job_id = ?1",
                [id.as_str()],
                |r| {
                    Ok(Attempts {
                        client: r.get(0)?,
                        count: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(u32::MAX),
                        last_error: r.get(2)?,
                        running: r.get::<_, i64>(3)? != 0,
                    })
                },
            )
            .optional()?)
    }

    // ---- sequences -------------------------------------------------------------------------

    /// The next number `key` applies (1 for a key never seen).
    pub fn next_expected(&self, key: &str) -> Result<u64, StorageError> {
        let next: Option<i64> =
            self.one("SELECT next FROM sequences WHERE key = ?1", [key], |r| r.get(0)).optional()?;
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
        let id: Option<String> = self
            .one(
                "SELECT id FROM jobs WHERE seq_key = ?1 AND seq_number = ?2",
                params![key, to_i64(number)?],
                |r| r.get(0),
            )
            .optional()?;
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
        let row = self
            .one(
                &format!("SELECT {PARKED_COLUMNS} FROM parked WHERE seq_key = ?1 AND seq_number = ?2"),
                params![key, n],
                parked_row,
            )
            .optional()?;
        let Some((id, mut parked)) = row else { return Ok(None) };
        self.exec("DELETE FROM parked WHERE seq_key = ?1 AND seq_number = ?2", params![key, n])?;
        parked.job_id = parse_id(&id)?;
        Ok(Some(parked))
    }

    /// Parked jobs whose gap deadline passed before `now_ms`, oldest first, at most `limit`.
    /// They stay parked until [`Tx::take_parked`]: the caller dead-letters first, then takes.
    pub fn expired_parked(&self, now_ms: i64, limit: u32) -> Result<Vec<Parked>, StorageError> {
        let mut stmt = self.tx.prepare_cached(&format!(
            "SELECT {PARKED_COLUMNS} FROM parked WHERE deadline_ms < ?1 ORDER BY deadline_ms LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![now_ms, limit], parked_row)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, mut parked) = row?;
            parked.job_id = parse_id(&id)?;
            out.push(parked);
        }
        Ok(out)
    }

    /// How many jobs wait for a predecessor.
    pub fn parked_count(&self) -> Result<u64, StorageError> {
        let n: i64 = self.one("SELECT count(*) FROM parked", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    // ---- vault -----------------------------------------------------------------------------

    /// Stores `record` for `owner`; answers its token.
    pub fn vault_put(&self, owner: &str, record: &Value) -> Result<String, StorageError> {
        // The time in milliseconds, then 80 random bits: unguessable, and new tokens land at the
        // end of the index instead of on a random page of it (see the gatekeeper's job ids).
        let mut raw = [0u8; 16];
        raw[..6].copy_from_slice(&now_ms().to_be_bytes()[2..]);
        SystemRandom::new()
            .fill(&mut raw[6..])
            .map_err(|_| StorageError::Corrupt("no system randomness".into()))?;
        let token = format!("tok_{}", JobId::from_bytes(raw));
        self.exec(
            "INSERT INTO vault (token, owner, record, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![token, owner, self.seal(record, &token)?, now_ms()],
        )?;
        Ok(token)
    }

    /// The record behind `token`, if `owner` stored it.
    pub fn vault_get(&self, owner: &str, token: &str) -> Result<Option<Value>, StorageError> {
        let record: Option<String> = self
            .one("SELECT record FROM vault WHERE token = ?1 AND owner = ?2", params![token, owner], |r| {
                r.get(0)
            })
            .optional()?;
        self.unseal(record, token)
    }

    /// Erases the record behind `token` if `owner` stored it; whether there was one.
    pub fn vault_delete(&self, owner: &str, token: &str) -> Result<bool, StorageError> {
        let n = self.exec("DELETE FROM vault WHERE token = ?1 AND owner = ?2", params![token, owner])?;
        Ok(n > 0)
    }

    // ---- ledger ----------------------------------------------------------------------------

    /// Adds `amount` to `account` and records `sequence` as its last applied number; answers
    /// the new balance. Fails (permanently) on overflow rather than wrapping.
    pub fn ledger_apply(
        &self,
        account: &str,
        amount: i64,
        sequence: u64,
    ) -> Result<Option<i64>, StorageError> {
        let (balance, _) = self.ledger_balance(account)?;
        let Some(new_balance) = balance.checked_add(amount) else {
            return Ok(None);
        };
        self.exec(
            "INSERT INTO ledger (account, balance, sequence) VALUES (?1, ?2, ?3)
             ON CONFLICT(account) DO UPDATE SET balance = excluded.balance, sequence = excluded.sequence",
            params![account, new_balance, to_i64(sequence)?],
        )?;
        Ok(Some(new_balance))
    }

    /// `(balance, last applied sequence number)`; `(0, 0)` for an account never touched.
    pub fn ledger_balance(&self, account: &str) -> Result<(i64, u64), StorageError> {
        let row: Option<(i64, i64)> = self
            .one("SELECT balance, sequence FROM ledger WHERE account = ?1", [account], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok(row.map_or((0, 0), |(b, s)| (b, s as u64)))
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
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring()).unwrap();
        store.transact(|tx| tx.record_job(&job(1, JobState::Succeeded, Some(("k", 1))))).await.unwrap();
        let err = store
            .transact(|tx| tx.record_job(&job(2, JobState::Succeeded, Some(("k", 1)))))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("UNIQUE"), "{err}");
        let holder = store.transact(|tx| tx.sequence_holder("k", 1)).await.unwrap();
        assert_eq!(holder, Some(id(1)));
    }

    #[tokio::test]
    async fn failed_closure_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring()).unwrap();
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
    async fn vault_is_owner_only_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let token = {
            let store = Store::open_sqlite(&path, test_keyring()).unwrap();
            let rec = serde_json::json!({"name": "Ada"});
            store.transact(move |tx| tx.vault_put("alice", &rec)).await.unwrap()
        };
        let store = Store::open_sqlite(&path, test_keyring()).unwrap();
        let t = token.clone();
        let got = store.transact(move |tx| tx.vault_get("alice", &t)).await.unwrap();
        assert_eq!(got, Some(serde_json::json!({"name": "Ada"})));
        let t = token.clone();
        assert_eq!(store.transact(move |tx| tx.vault_get("mallory", &t)).await.unwrap(), None);
        let t = token.clone();
        assert!(!store.transact(move |tx| tx.vault_delete("mallory", &t)).await.unwrap());
        let t = token.clone();
        assert!(store.transact(move |tx| tx.vault_delete("alice", &t)).await.unwrap());
    }

    #[tokio::test]
    async fn parked_jobs_come_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring()).unwrap();
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
    async fn attempts_count_up_and_remember_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring()).unwrap();
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
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring()).unwrap();
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
    async fn records_and_results_are_encrypted_at_rest_and_rekeyed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open_sqlite(&path, test_keyring()).unwrap();
        let rec = serde_json::json!({"secret": "MARKER-4711"});
        let token = store.transact(move |tx| tx.vault_put("alice", &rec)).await.unwrap();
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

        // Rotate: k2 becomes active; old rows stay readable, and rekey moves them to k2.
        let rotated = || Keyring::parse(&format!("k1 {}\nk2 {}", "ab".repeat(32), "cd".repeat(32))).unwrap();
        let store = Store::open_sqlite(&path, rotated()).unwrap();
        let t = token.clone();
        let got = store.transact(move |tx| tx.vault_get("alice", &t)).await.unwrap();
        assert_eq!(got.unwrap()["secret"], "MARKER-4711");
        assert_eq!(store.transact(|tx| tx.rekey()).await.unwrap(), 2);
        assert_eq!(store.transact(|tx| tx.rekey()).await.unwrap(), 0);
        drop(store);
        let only_k2 = Keyring::parse(&format!("k2 {}", "cd".repeat(32))).unwrap();
        let store = Store::open_sqlite(&path, only_k2).unwrap();
        let got = store.transact(move |tx| tx.job(&id(5))).await.unwrap().unwrap();
        assert_eq!(got.result.unwrap()["echo"], "MARKER-4711");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn closures_that_arrive_together_commit_together_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring()).unwrap();
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
}
