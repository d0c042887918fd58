//! Batches and workflows: jobs accepted whole, and what a client reads of them.

use std::collections::BTreeMap;

use gatehouse_protocol::batch::{BatchSummary, StepEvent, StepState};

use super::*;

/// One job of a batch as storage keeps it: a workflow step has a name and the names of the
/// steps it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: JobId,
    pub step: Option<String>,
    pub after: Vec<String>,
}

/// A member's state (`j` its record, `b` its `batch_jobs` row). A job that runs now has no
/// record (its hold's record went when it started; its outcome brings the next): its last
/// logged transition says where it is. A job with neither was pruned by retention: `expired`.
const STATE_OF_MEMBER: &str = "COALESCE(j.state,
    (SELECT e.state FROM job_events e WHERE e.job_id = b.job_id ORDER BY e.seq DESC LIMIT 1), 'expired')";

/// Most transitions one answer to a workflow's event stream carries.
const STEP_EVENTS_PER_ANSWER: u32 = 1_000;

impl Tx<'_> {
    /// Records batch (or `workflow`) `id` of `client` with its jobs, in order, and the job to
    /// run once they are all decided (its id and envelope, sealed at rest); answers `false`
    /// (and records nothing) when it was recorded before (a redelivery).
    pub fn record_batch(
        &self,
        id: &JobId,
        client: &str,
        workflow: bool,
        jobs: &[Member],
        on_complete: Option<(&JobId, &Value)>,
    ) -> Result<bool, StorageError> {
        let at = Place { table: "batches", column: "on_complete", row: id.as_str(), owner: client };
        let sealed = on_complete.map(|(_, envelope)| self.seal(envelope, &at)).transpose()?;
        let new = self.exec(
            "INSERT INTO batches (id, client, total, created_at_ms, on_complete_id, on_complete, workflow)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
            params![
                id.as_str(),
                client,
                i64::try_from(jobs.len()).unwrap_or(i64::MAX),
                now_ms(),
                on_complete.map(|(job, _)| job.as_str()),
                sealed,
                i64::from(workflow)
            ],
        )?;
        if new == 0 {
            return Ok(false);
        }
        for (position, job) in jobs.iter().enumerate() {
            let after = (!job.after.is_empty()).then(|| job.after.join(","));
            self.write(
                "INSERT INTO batch_jobs (batch_id, position, job_id, step, after_steps) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    id.as_str(),
                    i64::try_from(position).unwrap_or(i64::MAX),
                    job.id.as_str(),
                    job.step.as_deref(),
                    after
                ],
            )?;
        }
        Ok(true)
    }

    /// Batch (or workflow) `id`, if `client` owns it: its jobs in submission order, and how
    /// many are in each state (one already pruned counts as `expired`, one running between
    /// records as its last logged state); `complete` once every
    /// one is decided. A workflow's steps come with their names; with `events_after` (per step,
    /// the last transition seen) the transitions after those too.
    pub fn batch_of(
        &self,
        id: &JobId,
        client: &str,
        events_after: Option<&[u64]>,
    ) -> Result<Option<BatchSummary>, StorageError> {
        let owned = self.one(
            "SELECT workflow FROM batches WHERE id = ?1 AND client = ?2",
            params![id.as_str(), client],
            |r| r.get::<i64>(0),
        )?;
        let Some(workflow) = owned else { return Ok(None) };
        let rows = self.rows(
            &format!(
                "SELECT b.job_id, {STATE_OF_MEMBER}, b.step, b.after_steps FROM batch_jobs b LEFT JOIN jobs j ON j.id = b.job_id
                 WHERE b.batch_id = ?1 ORDER BY b.position"
            ),
            params![id.as_str()],
        )?;
        let (mut jobs, mut counts, mut complete) = (Vec::with_capacity(rows.len()), BTreeMap::new(), true);
        let mut steps = Vec::new();
        for row in &rows {
            let job = parse_id(&row.get::<String>(0)?)?;
            let state: String = row.get(1)?;
            complete &= JobState::parse(&state).is_none_or(|s| s.is_final());
            *counts.entry(state.clone()).or_default() += 1;
            if workflow != 0 {
                let after: Option<String> = row.get(3)?;
                steps.push(StepState {
                    name: row.get::<Option<String>>(2)?.unwrap_or_default(),
                    id: job.clone(),
                    state,
                    after: after.map(|a| a.split(',').map(str::to_owned).collect()).unwrap_or_default(),
                });
            }
            jobs.push(job);
        }
        let events = match events_after {
            Some(after) => Some(self.step_events(&jobs, client, after)?),
            None => None,
        };
        let status = if complete { "complete" } else { "running" }.to_owned();
        Ok(Some(BatchSummary { id: id.clone(), status, total: jobs.len(), counts, jobs, steps, events }))
    }

    /// The transitions of each of `jobs` after the one `after` gives for it (0 for none), oldest
    /// first.
    fn step_events(
        &self,
        jobs: &[JobId],
        client: &str,
        after: &[u64],
    ) -> Result<Vec<StepEvent>, StorageError> {
        let mut events = Vec::new();
        for (position, job) in jobs.iter().enumerate() {
            let from = after.get(position).copied().unwrap_or(0);
            let mine = self.job_events(job, client, from, STEP_EVENTS_PER_ANSWER)?;
            events.extend(mine.into_iter().map(|event| StepEvent { position, event }));
        }
        events.sort_by_key(|e| (e.event.at_ms, e.position, e.event.seq));
        events.truncate(STEP_EVENTS_PER_ANSWER as usize);
        Ok(events)
    }

    /// Batches whose jobs are all decided (or pruned; a job running between its records, which
    /// has logged transitions but no record, is not) and whose `on_complete` job was not sent
    /// yet (at most `limit`): each marked sent in this transaction (another worker's sweep finds it sent),
    /// answered with its client, summary and `on_complete` envelope.
    pub fn complete_batches(&self, limit: u32) -> Result<Vec<(BatchSummary, Value)>, StorageError> {
        let due = self.rows(
            &format!(
                "SELECT b.id, b.client, b.on_complete FROM batches b
                 WHERE b.completed_at_ms IS NULL AND b.on_complete IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM batch_jobs bj LEFT JOIN jobs j ON j.id = bj.job_id
                     WHERE bj.batch_id = b.id AND CASE WHEN j.id IS NULL
                         THEN EXISTS (SELECT 1 FROM job_events e WHERE e.job_id = bj.job_id)
                         ELSE NOT (j.{DECIDED}) END)
                 ORDER BY b.id LIMIT ?1{}",
                // (Another worker's sweep completing a batch: skipped, never waited for.)
                self.skip_locked()
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
            let Some(summary) = self.batch_of(&batch, &client, None)?.filter(|_| taken == 1) else {
                continue;
            };
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
