//! Attempts, progress and checkpoints: what an undecided job's attempts left — their count
//! and last error, the latest progress report and saved state (sealed).

use super::*;

impl Tx<'_> {
    /// Counts one more start of `id` and marks it running; answers the new count. Committed
    /// before the handler runs, so that a crash while running still counts (the next start
    /// finds it still marked running: [`Attempts::running`]).
    pub fn begin_attempt(&self, id: &JobId, client: &str) -> Result<u32, StorageError> {
        let count: i64 = self.must(
            "INSERT INTO attempts (job_id, client, count, running, updated_at_ms) VALUES (?1, ?2, 1, 1, ?3)
             ON CONFLICT(job_id) DO UPDATE SET count = attempts.count + 1, running = 1,
                 updated_at_ms = excluded.updated_at_ms
             RETURNING count",
            params![id.as_str(), client, now_ms()],
            |r| r.get(0),
        )?;
        self.log_state(id, client, JobState::Running)?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
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
        self.write("DELETE FROM attempts WHERE job_id = ?1", params![id.as_str()])
    }

    /// Records why the latest attempt of `id` failed.
    pub fn fail_attempt(&self, id: &JobId, error: &str) -> Result<(), StorageError> {
        self.lock_job(id)?;
        let Some(a) = self.attempts(id)? else { return Ok(()) };
        let sealed = self.seal_text(Some(error), &Place::attempt_error(id.as_str(), &a.client))?;
        self.write(
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
        .map(|a| self.opened_attempts(id, a))
        .transpose()
    }

    /// `a` as read, its last error unsealed.
    pub(super) fn opened_attempts(&self, id: &JobId, mut a: Attempts) -> Result<Attempts, StorageError> {
        a.last_error =
            self.unseal_text(a.last_error.take(), &Place::attempt_error(id.as_str(), &a.client))?;
        Ok(a)
    }
}

impl Tx<'_> {
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
    pub(super) fn set_latest(
        &self,
        table: &str,
        id: &JobId,
        client: &str,
        value: &Value,
    ) -> Result<(), StorageError> {
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

    pub(super) fn latest(
        &self,
        table: &str,
        id: &JobId,
        client: &str,
    ) -> Result<Option<Value>, StorageError> {
        let stored = self.one(
            &format!("SELECT value FROM {} WHERE job_id = ?1 AND client = ?2", identifier(table)?),
            params![id.as_str(), client],
            |r| r.get(0),
        )?;
        self.unseal(stored, &Place { table, column: "value", row: id.as_str(), owner: client })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use crate::Store;

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
}
