//! Jobs and their event log: each job's record (state, sealed outcome) and its numbered
//! state transitions for its live event stream.

use super::*;

/// A `jobs` row's columns as read: client, kind, state, result, error, seq_key, seq_number,
/// reason.
type JobColumns =
    (String, String, String, Option<String>, Option<String>, Option<String>, Option<i64>, Option<String>);

/// The job columns from `first` on; `None` when the row has no job (a probe's left join).
fn job_columns(r: &Row, first: usize) -> Result<Option<JobColumns>, StorageError> {
    let Some(client) = r.get::<Option<String>>(first)? else { return Ok(None) };
    Ok(Some((
        client,
        r.get(first + 1)?,
        r.get(first + 2)?,
        r.get(first + 3)?,
        r.get(first + 4)?,
        r.get(first + 5)?,
        r.get(first + 6)?,
        r.get(first + 7)?,
    )))
}

/// The probe of [`Tx::probe_paused`] for each row of `source`, which has columns `id` (a job
/// id) and `p1`, `p2` (pause targets): the job's record, its attempts, whether it was
/// cancelled, the pause in force; then `id`, `p1`, `p2` (rows of a set come in any order).
/// One text for one job and for a batch's jobs read ahead (`postgres::ahead`), where `lateral`
/// looks each job up on its own (PostgreSQL only): a join of a set that the planner may hash,
/// scanning the whole table, once a plan made while the table was small is reused.
pub(crate) fn probe_sql(source: &str, lateral: bool) -> String {
    let (jobs, attempts) = if lateral {
        (
            "LATERAL (SELECT * FROM jobs WHERE id = k.id LIMIT 1) j ON TRUE",
            "LATERAL (SELECT * FROM attempts WHERE job_id = k.id LIMIT 1) a ON TRUE",
        )
    } else {
        ("jobs j ON j.id = k.id", "attempts a ON a.job_id = k.id")
    };
    format!(
        "SELECT j.client, j.kind, j.state, j.result, j.error, j.seq_key, j.seq_number, j.reason,
                a.client, a.count, a.last_error, a.running,
                (SELECT COUNT(*) FROM cancelled c WHERE c.job_id = k.id),
                (SELECT MIN(p.target) FROM pauses p WHERE p.target IN (k.p1, k.p2)),
                k.id, k.p1, k.p2
             FROM {source}
             LEFT JOIN {jobs}
             LEFT JOIN {attempts}"
    )
}

impl Tx<'_> {
    /// The job with this id, whoever owns it.
    pub fn job(&self, id: &JobId) -> Result<Option<StoredJob>, StorageError> {
        let row = self.one(
            "SELECT client, kind, state, result, error, seq_key, seq_number, reason
                 FROM jobs WHERE id = ?1",
            params![id.as_str()],
            |r| job_columns(r, 0),
        )?;
        row.flatten().map(|cols| self.stored_job(id, cols)).transpose()
    }

    /// What storage knows of job `id` — its record, its attempts, whether it was cancelled — in
    /// one statement (one round trip on PostgreSQL), for the decision about a delivery.
    pub fn probe(&self, id: &JobId) -> Result<Probe, StorageError> {
        self.probe_paused(id, ["", ""])
    }

    /// [`Tx::probe`], answering too which of `pauses` (a kind's and a queue class's pause
    /// target, see [`Tx::pause`]) is in force, in the same statement.
    pub fn probe_paused(&self, id: &JobId, pauses: [&str; 2]) -> Result<Probe, StorageError> {
        let ahead = match &self.conn {
            Conn::Postgres(s) => s.probe_read_ahead(id.as_str(), pauses),
            Conn::Sqlite(_) => None,
        };
        let row = match ahead {
            Some(row) => row,
            None => self
                .rows(
                    &probe_sql(
                        "(SELECT CAST(?1 AS TEXT) AS id, CAST(?2 AS TEXT) AS p1, CAST(?3 AS TEXT) AS p2) k",
                        false,
                    ),
                    params![id.as_str(), pauses[0], pauses[1]],
                )?
                .into_iter()
                .next()
                .ok_or_else(|| StorageError::Corrupt("no row answered the probe".into()))?,
        };
        let attempts = match row.get::<Option<String>>(8)? {
            Some(client) => Some(Attempts {
                client,
                count: u32::try_from(row.get::<i64>(9)?).unwrap_or(u32::MAX),
                last_error: row.get(10)?,
                running: row.get::<i64>(11)? != 0,
            }),
            None => None,
        };
        let (cancelled, paused) = (row.get::<i64>(12)? > 0, row.get::<Option<String>>(13)?);
        let job = job_columns(&row, 0)?.map(|cols| self.stored_job(id, cols)).transpose()?;
        let attempts = attempts.map(|a| self.opened_attempts(id, a)).transpose()?;
        Ok(Probe { job, attempts, cancelled, paused })
    }

    fn stored_job(&self, id: &JobId, cols: JobColumns) -> Result<StoredJob, StorageError> {
        let (client, kind, state, result, error, key, number, reason) = cols;
        let state = JobState::parse(&state)
            .ok_or_else(|| StorageError::Corrupt(format!("unknown state {state:?}")))?;
        let result = self.unseal(result, &Place::job_result(id.as_str(), &client))?;
        let error = self.unseal_text(error, &Place::job_error(id.as_str(), &client))?;
        Ok(StoredJob {
            id: id.clone(),
            client,
            kind,
            state,
            result,
            error,
            reason,
            sequence: key.zip(number.map(|n| n as u64)),
            submitted_at_ms: None,
        })
    }

    /// Inserts the job or updates its state and outcome, and logs the state for its event
    /// stream. Nothing else: a decided job also needs [`Tx::on_decided`].
    pub fn record_job(&self, job: &StoredJob) -> Result<(), StorageError> {
        let (key, number) = match &job.sequence {
            Some((k, n)) => (Some(k.as_str()), Some(to_i64(*n)?)),
            None => (None, None),
        };
        let at = Place::job_result(job.id.as_str(), &job.client);
        let result = job.result.as_ref().map(|r| self.seal(r, &at)).transpose()?;
        let error = self.seal_text(job.error.as_deref(), &Place::job_error(job.id.as_str(), &job.client))?;
        let now = now_ms();
        // On PostgreSQL the event goes in the same statement (a data-modifying `WITH`, run
        // whether or not the rest reads it): one statement fewer per decided job. SQLite has no
        // such `WITH`: two statements, the same rows.
        let event = if self.is_postgres() {
            "WITH event AS (
                 INSERT INTO job_events (job_id, seq, client, state, at_ms)
                 SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?4, ?9 FROM job_events WHERE job_id = ?1
                 HAVING COALESCE((SELECT state FROM job_events WHERE job_id = ?1 ORDER BY seq DESC LIMIT 1), '') <> ?4
             ) "
        } else {
            self.log_state(&job.id, &job.client, job.state)?;
            ""
        };
        self.write(
            &format!(
                "{event}INSERT INTO jobs (id, client, kind, state, result, error, seq_key, seq_number, updated_at_ms,
                     reason, submitted_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT(id) DO UPDATE SET state = excluded.state, result = excluded.result,
                     error = excluded.error, reason = excluded.reason,
                     seq_key = excluded.seq_key, seq_number = excluded.seq_number,
                     updated_at_ms = excluded.updated_at_ms"
            ),
            params![
                job.id.as_str(),
                job.client,
                job.kind,
                job.state.as_str(),
                result,
                error,
                key,
                number,
                now,
                job.reason,
                job.submitted_at_ms.unwrap_or(now)
            ],
        )?;
        Ok(())
    }

    /// Records `job` (held: no outcome, no sequence) only if storage does not know it — one that
    /// another transaction records at the same moment is waited for and left as it is — and
    /// logs its state; answers whether it did.
    pub fn record_new_job(&self, job: &StoredJob) -> Result<bool, StorageError> {
        let now = now_ms();
        let new = self.exec(
            "INSERT INTO jobs (id, client, kind, state, updated_at_ms, submitted_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(id) DO NOTHING",
            params![
                job.id.as_str(),
                job.client,
                job.kind,
                job.state.as_str(),
                now,
                job.submitted_at_ms.unwrap_or(now)
            ],
        )?;
        if new == 1 {
            self.log_state(&job.id, &job.client, job.state)?;
        }
        Ok(new == 1)
    }

    /// Job `id` was decided (any final state): what only an undecided job has goes — its
    /// attempts, progress report and checkpoint, its client's cancellation mark, its singleton
    /// turn (the next job in line gets it), and its schedule's claim on it. Called in the
    /// transaction that records the outcome.
    pub fn on_decided(&self, id: &JobId) -> Result<(), StorageError> {
        self.clear_attempts(id)?;
        self.forget_cancelled(id)?;
        self.pass_turns(id)?;
        self.write("DELETE FROM progress WHERE job_id = ?1", params![id.as_str()])?;
        self.write("DELETE FROM checkpoints WHERE job_id = ?1", params![id.as_str()])?;
        self.write("UPDATE schedules SET running_job = NULL WHERE running_job = ?1", params![id.as_str()])?;
        Ok(())
    }

    /// For an operator's replay of the job's `dead_count`th dead letter: forgets the job (and
    /// its attempts) if it is dead-lettered and that was its latest dead letter, so that the
    /// replay runs it afresh. A job in any other state is kept as it is (the replay is then
    /// answered from it); a grant for an earlier dead letter is refused (`GrantTooOld`).
    pub fn forget_dead_lettered(&self, id: &JobId, dead_count: u32) -> Result<Forget, StorageError> {
        let dead: Option<String> = self.one(
            "SELECT state FROM jobs WHERE id = ?1 AND state = 'dead_lettered'",
            params![id.as_str()],
            |r| r.get(0),
        )?;
        if dead.is_none() {
            return Ok(Forget::NotDeadLettered);
        }
        if self.dead_count(id)? != dead_count {
            return Ok(Forget::GrantTooOld);
        }
        self.exec("DELETE FROM jobs WHERE id = ?1", params![id.as_str()])?;
        self.exec("DELETE FROM attempts WHERE job_id = ?1", params![id.as_str()])?;
        Ok(Forget::Forgotten)
    }

    /// Counts one more dead letter of job `id`; answers the count (1 for its first).
    pub fn count_dead_letter(&self, id: &JobId) -> Result<u32, StorageError> {
        self.lock_job(id)?;
        let count: i64 = self.must(
            "INSERT INTO dead_letters (job_id, count, at_ms) VALUES (?1, 1, ?2)
             ON CONFLICT(job_id) DO UPDATE SET count = dead_letters.count + 1, at_ms = excluded.at_ms
             RETURNING count",
            params![id.as_str(), now_ms()],
            |r| r.get(0),
        )?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// How many times job `id` was dead-lettered (0: never, or so long ago it was forgotten).
    pub fn dead_count(&self, id: &JobId) -> Result<u32, StorageError> {
        let n: Option<i64> =
            self.one("SELECT count FROM dead_letters WHERE job_id = ?1", params![id.as_str()], |r| r.get(0))?;
        Ok(n.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)))
    }

    /// Forgets the dead-letter counts of jobs last dead-lettered before `before_ms` (their
    /// messages are stale by then): at most `limit`.
    pub fn prune_dead_counts(&self, before_ms: i64, limit: u32) -> Result<u64, StorageError> {
        let n = self.exec(
            "DELETE FROM dead_letters WHERE job_id IN (SELECT job_id FROM dead_letters WHERE at_ms < ?1 ORDER BY at_ms LIMIT ?2)",
            params![before_ms, limit],
        )?;
        Ok(n as u64)
    }
}

impl Tx<'_> {
    /// Appends `state` to the state transitions of job `id` (of `client`), unless it is the
    /// latest already.
    pub fn log_state(&self, id: &JobId, client: &str, state: JobState) -> Result<(), StorageError> {
        // One statement: the next number, unless the latest state is this one already.
        self.write(
            "INSERT INTO job_events (job_id, seq, client, state, at_ms)
             SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?3, ?4 FROM job_events WHERE job_id = ?1
             HAVING COALESCE((SELECT state FROM job_events WHERE job_id = ?1 ORDER BY seq DESC LIMIT 1), '') <> ?3",
            params![id.as_str(), client, state.as_str(), now_ms()],
        )?;
        Ok(())
    }

    /// The state transitions of job `id` of `client` after number `after`, oldest first, at
    /// most `limit`.
    pub fn job_events(
        &self,
        id: &JobId,
        client: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<gatehouse_protocol::JobEvent>, StorageError> {
        let rows = self.rows(
            "SELECT seq, state, at_ms FROM job_events WHERE job_id = ?1 AND client = ?2 AND seq > ?3
             ORDER BY seq LIMIT ?4",
            params![id.as_str(), client, to_i64(after)?, limit],
        )?;
        let mut out = Vec::new();
        for row in &rows {
            let (seq, state, at_ms) = (row.get::<i64>(0)?, row.get::<String>(1)?, row.get::<i64>(2)?);
            let status = JobState::parse(&state).ok_or_else(|| {
                StorageError::Corrupt(format!("job {id}: unknown state {state:?} in its events"))
            })?;
            out.push(gatehouse_protocol::JobEvent {
                seq: seq.max(0) as u64,
                status,
                at_ms: at_ms.max(0) as u64,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use crate::Store;

    #[tokio::test]
    async fn a_probe_reads_the_record_attempts_and_cancellation_the_single_reads_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
        let probe = |n: u8| store.transact(move |tx| tx.probe(&id(n)));
        assert!(probe(1).await.unwrap().is_fresh(), "nothing stored");
        store.transact(|tx| tx.mark_cancelled(&id(2), "c")).await.unwrap();
        store.transact(|tx| tx.begin_attempt(&id(3), "c").map(drop)).await.unwrap();
        store.transact(|tx| tx.fail_attempt(&id(3), "boom")).await.unwrap();
        let done =
            StoredJob { result: Some(serde_json::json!({"n": 1})), ..job(4, JobState::Succeeded, None) };
        store.transact(move |tx| tx.record_job(&done)).await.unwrap();
        for n in 1..=4 {
            let (p, one_by_one) = store
                .transact(move |tx| {
                    let p = tx.probe(&id(n))?;
                    Ok::<_, StorageError>((
                        p,
                        (tx.job(&id(n))?, tx.attempts(&id(n))?, tx.is_cancelled(&id(n))?),
                    ))
                })
                .await
                .unwrap();
            assert_eq!((p.job, p.attempts, p.cancelled), one_by_one, "job {n}");
        }
        assert!(!probe(2).await.unwrap().is_fresh() && !probe(3).await.unwrap().is_fresh());
    }

    #[tokio::test]
    async fn the_event_log_numbers_states_and_skips_a_repeat_of_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
        for state in [JobState::Running, JobState::Running, JobState::Retrying, JobState::Running] {
            store.transact(move |tx| tx.log_state(&id(1), "c", state)).await.unwrap();
        }
        let events = store.transact(|tx| tx.job_events(&id(1), "c", 0, 10)).await.unwrap();
        let got: Vec<String> = events.iter().map(|e| serde_json::to_string(e).unwrap()).collect();
        assert_eq!(events.len(), 3, "{got:?}");
        assert!(
            got[0].contains("running") && got[1].contains("retrying") && got[2].contains("running"),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn a_replay_forgets_a_dead_lettered_job_only_for_its_latest_dead_letter() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
        let dead = || async {
            store
                .transact(|tx| {
                    let n = tx.count_dead_letter(&id(9))?;
                    tx.record_job(&job(9, JobState::DeadLettered, None))?;
                    Ok::<_, StorageError>(n)
                })
                .await
                .unwrap()
        };
        assert_eq!(dead().await, 1);
        // Dead-lettered again before the grant for the first came back: whatever the clocks say
        // (a grant issued "later" by a clock ahead), the grant is for dead letter 1, not 2.
        assert_eq!(dead().await, 2);
        let forget = |n| store.transact(move |tx| tx.forget_dead_lettered(&id(9), n));
        assert_eq!(forget(1).await.unwrap(), Forget::GrantTooOld);
        assert_eq!(forget(2).await.unwrap(), Forget::Forgotten);
        assert_eq!(forget(2).await.unwrap(), Forget::NotDeadLettered, "the job runs afresh");
        // The count outlives the forgotten record: a third dead letter is 3, and grant 2 is old.
        assert_eq!(dead().await, 3);
        assert_eq!(forget(2).await.unwrap(), Forget::GrantTooOld);
    }
}

/// What a client's job list asks for (`Tx::list_jobs`): newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only jobs in this state (as stored: `succeeded`, `waiting_for_turn`, …).
    pub state: Option<String>,
    pub kind: Option<String>,
    /// Only jobs submitted after this time (unix ms).
    pub submitted_after_ms: Option<i64>,
    /// Only jobs listed after this one (the last of the previous page): (submitted_at_ms, id).
    pub after: Option<(i64, String)>,
    /// Only the jobs of this batch of the client's.
    pub batch: Option<String>,
    /// Only the steps of this workflow of the client's.
    pub workflow: Option<String>,
    pub limit: u32,
}

/// One job of a client's list: metadata only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedJob {
    pub id: String,
    pub kind: String,
    pub state: String,
    pub submitted_at_ms: i64,
    pub updated_at_ms: i64,
    /// Attempts started, while the job is undecided (a decided job's count is not kept).
    pub attempts: Option<u32>,
}

/// A client's jobs, newest first, from the index `jobs_by_client` (client, submitted_at_ms,
/// id): the page after `?5`/`?6` of at most `?7` rows; never a scan of the table.
const LIST_JOBS: &str = "SELECT j.id, j.kind, j.state, j.submitted_at_ms, j.updated_at_ms, a.count
     FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id
     WHERE j.client = ?1
       AND (CAST(?2 AS TEXT) IS NULL OR j.state = ?2)
       AND (CAST(?3 AS TEXT) IS NULL OR j.kind = ?3)
       AND j.submitted_at_ms > ?4
       AND (j.submitted_at_ms < ?5 OR (j.submitted_at_ms = ?5 AND j.id < ?6))
     ORDER BY j.submitted_at_ms DESC, j.id DESC
     LIMIT ?7";

/// [`LIST_JOBS`] within one batch or workflow (`?8`, `?9`: whether a workflow), and with
/// `?10` only those that are steps of that workflow too. Driven by the group's members (at most
/// 1,000 by construction): the `LIMIT` in the subquery keeps both planners from flattening it
/// into a walk of the client's whole job list, so each member is looked up by its id.
const LIST_GROUP_JOBS: &str = "SELECT j.id, j.kind, j.state, j.submitted_at_ms, j.updated_at_ms, a.count
     FROM (SELECT b.job_id FROM batches g JOIN batch_jobs b ON b.batch_id = g.id
           WHERE g.id = ?8 AND g.client = ?1 AND g.workflow = ?9 LIMIT 1000) m
     JOIN jobs j ON j.id = m.job_id
     LEFT JOIN attempts a ON a.job_id = j.id
     WHERE j.client = ?1
       AND (CAST(?10 AS TEXT) IS NULL OR EXISTS (
           SELECT 1 FROM batches wg JOIN batch_jobs w ON w.batch_id = wg.id
           WHERE wg.id = ?10 AND wg.client = ?1 AND wg.workflow = 1 AND w.job_id = j.id))
       AND (CAST(?2 AS TEXT) IS NULL OR j.state = ?2)
       AND (CAST(?3 AS TEXT) IS NULL OR j.kind = ?3)
       AND j.submitted_at_ms > ?4
       AND (j.submitted_at_ms < ?5 OR (j.submitted_at_ms = ?5 AND j.id < ?6))
     ORDER BY j.submitted_at_ms DESC, j.id DESC
     LIMIT ?7";

impl Tx<'_> {
    /// `client`'s jobs that `filter` selects, newest first (by submission, then id).
    pub fn list_jobs(&self, client: &str, filter: &JobFilter) -> Result<Vec<ListedJob>, StorageError> {
        let (before_ms, before_id) = filter.after.clone().unwrap_or((i64::MAX, String::new()));
        let (state, kind, since, limit) =
            (&filter.state, &filter.kind, filter.submitted_after_ms.unwrap_or(-1), i64::from(filter.limit));
        // Driven by the batch when there is one (then only its jobs that are the workflow's
        // steps too), else by the workflow.
        let group = match (&filter.batch, &filter.workflow) {
            (Some(batch), also) => Some((batch.as_str(), 0i64, also.as_deref())),
            (None, Some(workflow)) => Some((workflow.as_str(), 1, None)),
            (None, None) => None,
        };
        let rows = match group {
            Some((group, workflow, also)) => self.rows(
                LIST_GROUP_JOBS,
                params![client, state, kind, since, before_ms, before_id, limit, group, workflow, also],
            )?,
            None => self.rows(LIST_JOBS, params![client, state, kind, since, before_ms, before_id, limit])?,
        };
        rows.iter()
            .map(|r| {
                Ok(ListedJob {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    state: r.get(2)?,
                    submitted_at_ms: r.get(3)?,
                    updated_at_ms: r.get(4)?,
                    attempts: r.get::<Option<i64>>(5)?.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
                })
            })
            .collect()
    }

    /// How the backend runs [`Tx::list_jobs`] (`EXPLAIN QUERY PLAN` / `EXPLAIN`), one line per
    /// step: for operators and the tests that show it uses the index.
    /// `group`: the plan of a list within one batch or workflow.
    pub fn list_jobs_plan(&self, group: bool) -> Result<String, StorageError> {
        let (explain, column) = if self.is_postgres() { ("EXPLAIN ", 0) } else { ("EXPLAIN QUERY PLAN ", 3) };
        let none = None::<String>;
        let rows = if group {
            self.rows(
                &format!("{explain}{LIST_GROUP_JOBS}"),
                params!["c", none, none, -1i64, i64::MAX, "", 50i64, "b", 0i64, none],
            )?
        } else {
            self.rows(&format!("{explain}{LIST_JOBS}"), params!["c", none, none, -1i64, i64::MAX, "", 50i64])?
        };
        rows.iter().map(|r| r.get::<String>(column)).collect::<Result<Vec<_>, _>>().map(|l| l.join("\n"))
    }
}
