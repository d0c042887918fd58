//! Cancellation: jobs their clients cancelled before they ran.

use super::*;

impl Tx<'_> {
    /// Marks `id` cancelled by `client` (again: no change); a delayed or paused job comes due at
    /// once, to be decided `cancelled` in its turn.
    pub fn mark_cancelled(&self, id: &JobId, client: &str) -> Result<(), StorageError> {
        self.exec(
            "INSERT INTO cancelled (job_id, client, at_ms) VALUES (?1, ?2, ?3) ON CONFLICT(job_id) DO NOTHING",
            params![id.as_str(), client, now_ms()],
        )?;
        self.exec(
            "UPDATE scheduled SET due_ms = 0, released = 0, claimed_until_ms = 0 WHERE job_id = ?1",
            params![id.as_str()],
        )?;
        self.release_paused(id)
    }

    /// Whether `id` was cancelled (and not yet decided so).
    pub fn is_cancelled(&self, id: &JobId) -> Result<bool, StorageError> {
        Ok(self.one("SELECT 1 FROM cancelled WHERE job_id = ?1", params![id.as_str()], |_| Ok(()))?.is_some())
    }

    /// Forgets the cancellation of a job that is decided now.
    pub fn forget_cancelled(&self, id: &JobId) -> Result<(), StorageError> {
        self.write("DELETE FROM cancelled WHERE job_id = ?1", params![id.as_str()])
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
}
