//! Batches: jobs accepted whole, and what a client reads of them.

use std::collections::BTreeMap;

use gatehouse_protocol::batch::BatchSummary;

use super::*;

impl Tx<'_> {
    /// Records batch `id` of `client` with its jobs, in order, and the job to run once they
    /// are all decided (its id and envelope, sealed at rest); answers `false` (and records
    /// nothing) when it was recorded before (a redelivery).
    pub fn record_batch(
        &self,
        id: &JobId,
        client: &str,
        jobs: &[JobId],
        on_complete: Option<(&JobId, &Value)>,
    ) -> Result<bool, StorageError> {
        let at = Place { table: "batches", column: "on_complete", row: id.as_str(), owner: client };
        let sealed = on_complete.map(|(_, envelope)| self.seal(envelope, &at)).transpose()?;
        let new = self.exec(
            "INSERT INTO batches (id, client, total, created_at_ms, on_complete_id, on_complete)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
            params![
                id.as_str(),
                client,
                i64::try_from(jobs.len()).unwrap_or(i64::MAX),
                now_ms(),
                on_complete.map(|(job, _)| job.as_str()),
                sealed
            ],
        )?;
        if new == 0 {
            return Ok(false);
        }
        for (position, job) in jobs.iter().enumerate() {
            self.write(
                "INSERT INTO batch_jobs (batch_id, position, job_id) VALUES (?1, ?2, ?3)",
                params![id.as_str(), i64::try_from(position).unwrap_or(i64::MAX), job.as_str()],
            )?;
        }
        Ok(true)
    }

    /// Batch `id`, if `client` owns it: its jobs in submission order, and how many are in each
    /// state (one already pruned counts as `expired`); `complete` once every one is decided.
    pub fn batch_of(&self, id: &JobId, client: &str) -> Result<Option<BatchSummary>, StorageError> {
        let owned = self.one(
            "SELECT 1 FROM batches WHERE id = ?1 AND client = ?2",
            params![id.as_str(), client],
            |_| Ok(()),
        )?;
        if owned.is_none() {
            return Ok(None);
        }
        let rows = self.rows(
            "SELECT b.job_id, j.state FROM batch_jobs b LEFT JOIN jobs j ON j.id = b.job_id
             WHERE b.batch_id = ?1 ORDER BY b.position",
            params![id.as_str()],
        )?;
        let (mut jobs, mut counts, mut complete) = (Vec::with_capacity(rows.len()), BTreeMap::new(), true);
        for row in &rows {
            jobs.push(parse_id(&row.get::<String>(0)?)?);
            let state = row.get::<Option<String>>(1)?.unwrap_or_else(|| "expired".to_owned());
            complete &= JobState::parse(&state).is_none_or(|s| s.is_final());
            *counts.entry(state).or_default() += 1;
        }
        let status = if complete { "complete" } else { "running" }.to_owned();
        Ok(Some(BatchSummary { id: id.clone(), status, total: jobs.len(), counts, jobs }))
    }

    /// Batches whose jobs are all decided and whose `on_complete` job was not sent yet (at most
    /// `limit`): each marked sent in this transaction (another worker's sweep finds it sent),
    /// answered with its client, summary and `on_complete` envelope.
    pub fn complete_batches(&self, limit: u32) -> Result<Vec<(BatchSummary, Value)>, StorageError> {
        let due = self.rows(
            &format!(
                "SELECT b.id, b.client, b.on_complete FROM batches b
                 WHERE b.completed_at_ms IS NULL AND b.on_complete IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM batch_jobs bj JOIN jobs j ON j.id = bj.job_id
                     WHERE bj.batch_id = b.id AND NOT (j.{DECIDED}))
                 LIMIT ?1"
            ),
            params![limit],
        )?;
        let mut out = Vec::with_capacity(due.len());
        for row in &due {
            let (id, client, stored): (String, String, Option<String>) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            let taken = self.exec(
                "UPDATE batches SET completed_at_ms = ?2 WHERE id = ?1 AND completed_at_ms IS NULL",
                params![id.as_str(), now_ms()],
            )?;
            let batch = parse_id(&id)?;
            let Some(summary) = self.batch_of(&batch, &client)?.filter(|_| taken == 1) else { continue };
            let at = Place { table: "batches", column: "on_complete", row: &id, owner: &client };
            if let Some(envelope) = self.unseal(stored, &at)? {
                out.push((summary, envelope));
            }
        }
        Ok(out)
    }

    /// Forgets at most `limit` batches none of whose jobs is stored any more (retention pruned
    /// them all); answers how many.
    pub fn prune_batches(&self, limit: u32) -> Result<u64, StorageError> {
        let gone = self.rows(
            "SELECT b.id FROM batches b WHERE NOT EXISTS (
                 SELECT 1 FROM batch_jobs bj JOIN jobs j ON j.id = bj.job_id WHERE bj.batch_id = b.id)
             LIMIT ?1",
            params![limit],
        )?;
        for row in &gone {
            let id: String = row.get(0)?;
            self.exec("DELETE FROM batch_jobs WHERE batch_id = ?1", params![id.as_str()])?;
            self.exec("DELETE FROM batches WHERE id = ?1", params![id.as_str()])?;
        }
        Ok(gone.len() as u64)
    }
}
