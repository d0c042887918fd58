//! Jobs that wait for other jobs (`after`): held `waiting_for_parents`, their message kept,
//! until every parent is decided; then released to their queue by the held-messages sweep.

use super::*;

/// A held message not due until its parents are decided ([`Tx::release_children`] makes it
/// due).
const NOT_YET: i64 = i64::MAX;

impl Tx<'_> {
    /// How each of `parents` stands for `client`: its record (`None`: not stored, or another
    /// client's — never told apart).
    pub fn parents(&self, parents: &[JobId], client: &str) -> Result<Vec<Option<StoredJob>>, StorageError> {
        parents.iter().map(|id| Ok(self.job(id)?.filter(|job| job.client == client))).collect()
    }

    /// Holds the message of job `id` (recorded `waiting_for_parents` by the caller) until every
    /// one of `parents` is decided.
    pub fn wait_for_parents(
        &self,
        id: &JobId,
        parents: &[JobId],
        envelope: &[u8],
    ) -> Result<(), StorageError> {
        for parent in parents {
            self.write(
                "INSERT INTO job_parents (job_id, parent_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![id.as_str(), parent.as_str()],
            )?;
        }
        self.exec(
            "INSERT INTO scheduled (job_id, due_ms, envelope) VALUES (?1, ?2, ?3)
             ON CONFLICT (job_id) DO UPDATE SET due_ms = excluded.due_ms, envelope = excluded.envelope,
                 released = 0, claimed_until_ms = 0",
            params![id.as_str(), NOT_YET, envelope],
        )?;
        Ok(())
    }

    /// Makes due now (at most `limit` of) the held messages of jobs waiting for parents that
    /// are all decided, for the sweep to send back to their queues; answers how many. A parent
    /// storage does not know (not recorded yet) keeps its children waiting. On PostgreSQL the
    /// rows another worker's sweep (or a delivery) holds are skipped, never waited for: two
    /// sweeps releasing one fan-out's children at once deadlocked otherwise.
    pub fn release_children(&self, now_ms: i64, limit: u32) -> Result<usize, StorageError> {
        let skip = if self.is_postgres() { " FOR UPDATE OF s SKIP LOCKED" } else { "" };
        self.exec(
            &format!(
                "UPDATE scheduled SET due_ms = ?1, released = 0, claimed_until_ms = 0 WHERE due_ms = ?2 AND job_id IN (
                     SELECT s.job_id FROM scheduled s JOIN jobs j ON j.id = s.job_id
                     WHERE s.due_ms = ?2 AND j.state = 'waiting_for_parents' AND NOT EXISTS (
                         SELECT 1 FROM job_parents p LEFT JOIN jobs pj ON pj.id = p.parent_id AND pj.client = j.client
                         WHERE p.job_id = j.id AND (pj.id IS NULL OR NOT (pj.{DECIDED})))
                     ORDER BY s.job_id LIMIT ?3{skip})"
            ),
            params![now_ms, NOT_YET, limit],
        )
    }

    /// Whether anything waits for jobs to be decided: a job for its parents, or a batch's
    /// `on_complete` job for the batch (both found through partial indexes).
    pub fn waiting_for_decisions(&self) -> Result<bool, StorageError> {
        let one = self.one(
            "SELECT 1 WHERE EXISTS (SELECT 1 FROM jobs WHERE state = 'waiting_for_parents')
                 OR EXISTS (SELECT 1 FROM batches WHERE completed_at_ms IS NULL AND on_complete IS NOT NULL)",
            params![],
            |_| Ok(()),
        )?;
        Ok(one.is_some())
    }

    /// Job `id` waits for its parents no longer (it runs, or is decided, now): its held message
    /// and its `waiting_for_parents` record (and its parents with it) are forgotten.
    pub fn stop_waiting_for_parents(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM scheduled WHERE job_id = ?1", params![id.as_str()])?;
        self.exec("DELETE FROM jobs WHERE id = ?1 AND state = 'waiting_for_parents'", params![id.as_str()])?;
        Ok(())
    }
}
