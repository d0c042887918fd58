//! Leases: the messages of handed-off jobs, held for the attempt whose token they carry.

use super::*;

impl Tx<'_> {
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
}
