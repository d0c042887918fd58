//! Held messages: delayed jobs until their time, handed-off jobs under a lease, singleton
//! jobs waiting for their turn.

use super::*;

// Delayed jobs: messages held until their time, claimed by one sweep, sent back.
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

    /// Records that the delayed job's message, claimed until `claimed_until_ms`, went back to
    /// its queue (sent again only if this is never recorded: a crash in between sends it twice,
    /// and the job id dedupes). Only that claim's row: the message may be back, and held anew
    /// (a job now waiting for its parents), before this is recorded.
    pub fn mark_released(&self, id: &JobId, claimed_until_ms: i64) -> Result<(), StorageError> {
        self.exec(
            "UPDATE scheduled SET released = 1 WHERE job_id = ?1 AND claimed_until_ms = ?2",
            params![id.as_str(), claimed_until_ms],
        )?;
        Ok(())
    }

    /// When delayed job `id` is due, if it is still held.
    pub fn scheduled_due(&self, id: &JobId) -> Result<Option<u64>, StorageError> {
        let due: Option<i64> =
            self.one("SELECT due_ms FROM scheduled WHERE job_id = ?1", params![id.as_str()], |r| r.get(0))?;
        Ok(due.map(|d| d.max(0) as u64))
    }

    /// Forgets that `id` was held (its time came and it runs now): the held message and the
    /// `scheduled` or `throttled` record.
    pub fn unschedule(&self, id: &JobId) -> Result<(), StorageError> {
        if let Some(job) =
            self.job(id)?.filter(|j| matches!(j.state, JobState::Scheduled | JobState::Throttled))
        {
            self.log_state(id, &job.client, JobState::Queued)?;
        }
        self.exec("DELETE FROM scheduled WHERE job_id = ?1", params![id.as_str()])?;
        self.exec(
            "DELETE FROM jobs WHERE id = ?1 AND state IN ('scheduled', 'throttled')",
            params![id.as_str()],
        )?;
        Ok(())
    }

    /// How many delayed jobs are held.
    pub fn scheduled_count(&self) -> Result<u64, StorageError> {
        let n: i64 = self.must("SELECT count(*) FROM scheduled", params![], |r| r.get(0))?;
        Ok(n as u64)
    }
}

/// The holder of a lease whose message the sweeper is sending back.
pub const SENT_BACK: &str = "sent back";

// Leases: the messages of handed-off jobs, held for the attempt whose token they carry.
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
    /// `now_ms` (a singleton job's turn: one attempt at a time); `false` when it is. A lease the
    /// sweeper claimed to send its message back ([`SENT_BACK`]) is taken: this is the attempt
    /// that message is for.
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
             WHERE leases.expires_at_ms <= ?5 OR leases.holder = excluded.holder OR leases.holder = ?6",
            params![id.as_str(), envelope, expires_at_ms, holder, now_ms, SENT_BACK],
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

    /// Forgets `holder`'s lease of `id`: its attempt ended, or with [`SENT_BACK`], the message
    /// of a lease that ran out is back in its queue (unless the attempt it is for took the lease
    /// already).
    pub fn end_lease(&self, id: &JobId, holder: &str) -> Result<(), StorageError> {
        self.exec("DELETE FROM leases WHERE job_id = ?1 AND holder = ?2", params![id.as_str(), holder])?;
        Ok(())
    }

    /// Claims leases not renewed by `now_ms` (their worker died while running them), at most
    /// `limit`, for the caller to send their messages back: each lease is extended to
    /// `claimed_until_ms`, so that no other worker's sweep sends them too, and held by
    /// [`SENT_BACK`], so that the attempt the message comes back for may take it (before the
    /// caller ends it: the message may be back first).
    pub fn claim_expired_leases(
        &self,
        now_ms: i64,
        claimed_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<(JobId, Vec<u8>)>, StorageError> {
        let sql = format!(
            "UPDATE leases SET expires_at_ms = ?2, holder = ?4
             WHERE expires_at_ms <= ?1 AND job_id IN (
                 SELECT job_id FROM leases WHERE expires_at_ms <= ?1 ORDER BY expires_at_ms LIMIT ?3{}
             ) RETURNING job_id, envelope",
            self.skip_locked()
        );
        self.rows(&sql, params![now_ms, claimed_until_ms, limit, SENT_BACK])?
            .iter()
            .map(|r| Ok((parse_id(&r.get::<String>(0)?)?, r.get(1)?)))
            .collect()
    }
}

// Start rates.
impl Tx<'_> {
    /// Reserves the next start of rated `key` (one every `interval_us`, up to `burst` at once
    /// after a quiet while: the generic cell rate algorithm) for a job arriving at `now_us`;
    /// answers when it may start (`now_us` or later). One statement; the reservations of
    /// concurrent workers queue on the key's row.
    pub fn reserve_start(
        &self,
        key: &str,
        now_us: i64,
        interval_us: i64,
        burst: u32,
    ) -> Result<i64, StorageError> {
        let tat: i64 = self.must(
            "INSERT INTO rates (key, tat_us) VALUES (?1, CAST(?2 AS BIGINT) + CAST(?3 AS BIGINT))
             ON CONFLICT(key) DO UPDATE SET
                 tat_us = (CASE WHEN rates.tat_us > CAST(?2 AS BIGINT) THEN rates.tat_us ELSE CAST(?2 AS BIGINT) END)
                     + CAST(?3 AS BIGINT)
             RETURNING tat_us",
            params![key, now_us, interval_us],
            |r| r.get(0),
        )?;
        // The start this reservation is for, less the burst's tolerance.
        let tolerance = interval_us.saturating_mul(i64::from(burst.max(1)) - 1);
        Ok((tat - interval_us - tolerance).max(now_us))
    }
}

// Turns: the jobs that hold each limited key's turns (up to its running limit, see
// `KindSpec::running_limit`), and the jobs waiting for one, in arrival order.
impl Tx<'_> {
    /// Takes job `id` out of the waiting line (it was refused).
    pub fn stop_waiting(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM singleton_waiting WHERE job_id = ?1", params![id.as_str()])?;
        Ok(())
    }

    /// Takes a turn of `key` for job `id` if fewer than `limit` are held (or it holds one
    /// already); otherwise queues the job's message behind the others waiting and answers
    /// `false`.
    pub fn take_turn(
        &self,
        key: &str,
        id: &JobId,
        envelope: &[u8],
        limit: u32,
    ) -> Result<bool, StorageError> {
        self.lock(&format!("turn {key}"))?;
        let (held, mine): (i64, i64) = self.must(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN job_id = ?2 THEN 1 ELSE 0 END), 0) FROM turns WHERE key = ?1",
            params![key, id.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if mine > 0 {
            return Ok(true);
        }
        if held < i64::from(limit) {
            self.exec("INSERT INTO turns (key, job_id) VALUES (?1, ?2)", params![key, id.as_str()])?;
            return Ok(true);
        }
        self.exec(
            "INSERT INTO singleton_waiting (key, job_id, envelope) VALUES (?1, ?2, ?3)
             ON CONFLICT(job_id) DO NOTHING",
            params![key, id.as_str(), envelope],
        )?;
        Ok(false)
    }

    /// Job `id` is decided: each turn it held passes to the next job waiting for that key (its
    /// message goes back to its queue, through the delayed-job sweeper, at once), or is freed.
    pub(super) fn pass_turns(&self, id: &JobId) -> Result<(), StorageError> {
        let keys: Vec<String> = self
            .rows("SELECT key FROM turns WHERE job_id = ?1", params![id.as_str()])?
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
                    self.write(
                        "UPDATE turns SET job_id = ?1 WHERE key = ?2 AND job_id = ?3",
                        params![next, key, id.as_str()],
                    )?;
                    self.write("DELETE FROM singleton_waiting WHERE seq = ?1", params![seq])?;
                    self.write(
                        "INSERT INTO scheduled (job_id, due_ms, envelope) VALUES (?1, 0, ?2)
                         ON CONFLICT(job_id) DO UPDATE SET due_ms = 0, released = 0, claimed_until_ms = 0,
                             envelope = excluded.envelope",
                        params![next, envelope],
                    )?;
                }
                None => {
                    self.write(
                        "DELETE FROM turns WHERE key = ?1 AND job_id = ?2",
                        params![&key, id.as_str()],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Forgets the message of a singleton job whose turn came (it runs now).
    pub fn turn_taken(&self, id: &JobId) -> Result<(), StorageError> {
        self.write("DELETE FROM scheduled WHERE job_id = ?1", params![id.as_str()])?;
        self.write("DELETE FROM jobs WHERE id = ?1 AND state = 'waiting_for_turn'", params![id.as_str()])
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use crate::Store;

    /// A rate of one start per 100 ms with a burst of 3: after a quiet while three start at
    /// once, then one per interval; later arrivals queue behind the reservations.
    #[tokio::test]
    async fn start_reservations_follow_the_rate_and_its_burst() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
        let starts = store
            .transact(|tx| {
                let mut at = Vec::new();
                for _ in 0..6 {
                    at.push(tx.reserve_start("k", 1_000_000, 100_000, 3)?);
                }
                // Long after: the burst is back.
                at.push(tx.reserve_start("k", 9_000_000, 100_000, 3)?);
                at.push(tx.reserve_start("other", 1_000_000, 100_000, 1)?);
                Ok::<_, crate::StorageError>(at)
            })
            .await
            .unwrap();
        assert_eq!(
            starts,
            [1_000_000, 1_000_000, 1_000_000, 1_100_000, 1_200_000, 1_300_000, 9_000_000, 1_000_000]
        );
    }
}
