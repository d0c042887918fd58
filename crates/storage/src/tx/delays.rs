//! Delayed jobs: messages held until their time, claimed by one sweep, sent back.

use super::*;

impl Tx<'_> {
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
    pub(super) fn claimed(
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
}
