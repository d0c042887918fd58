//! Batches: jobs accepted whole, and what a client reads of them.

use std::collections::BTreeMap;

use super::*;

/// What storage knows of a batch: its jobs in submission order, and how many are in each state
/// (a job already pruned counts as `expired`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub jobs: Vec<JobId>,
    pub counts: BTreeMap<String, usize>,
    /// Whether every job is decided (or pruned).
    pub complete: bool,
}

impl Tx<'_> {
    /// Records batch `id` of `client` with its jobs, in order; answers `false` (and records
    /// nothing) when it was recorded before (a redelivery).
    pub fn record_batch(&self, id: &JobId, client: &str, jobs: &[JobId]) -> Result<bool, StorageError> {
        let new = self.exec(
            "INSERT INTO batches (id, client, total, created_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO NOTHING",
            params![id.as_str(), client, i64::try_from(jobs.len()).unwrap_or(i64::MAX), now_ms()],
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

    /// Batch `id`, if `client` owns it.
    pub fn batch_of(&self, id: &JobId, client: &str) -> Result<Option<BatchRecord>, StorageError> {
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
        let mut record =
            BatchRecord { jobs: Vec::with_capacity(rows.len()), counts: BTreeMap::new(), complete: true };
        for row in &rows {
            record.jobs.push(parse_id(&row.get::<String>(0)?)?);
            let state = row.get::<Option<String>>(1)?.unwrap_or_else(|| "expired".to_owned());
            let decided = JobState::parse(&state).is_none_or(|s| s.is_final());
            record.complete &= decided;
            *record.counts.entry(state).or_default() += 1;
        }
        Ok(Some(record))
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
