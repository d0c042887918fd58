//! Progress and checkpoints: the latest report and saved state of a running job, sealed.

use super::*;

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
