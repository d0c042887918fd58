//! Pauses: kinds and queue classes an operator paused (`gatehouse pause`), and the jobs held
//! for them, in arrival order, until they are resumed. A target is `kind:<name>` or
//! `queue:<class>`; [`Tx::probe_paused`] reads it with the job's record.

use super::*;

/// A pause in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub target: String,
    pub since_ms: i64,
    /// Jobs held for it.
    pub held: u64,
}

impl Tx<'_> {
    /// Pauses `target` (again: no change); answers whether it was running.
    pub fn pause(&self, target: &str) -> Result<bool, StorageError> {
        let n = self.exec(
            "INSERT INTO pauses (target, since_ms) VALUES (?1, ?2) ON CONFLICT(target) DO NOTHING",
            params![target, now_ms()],
        )?;
        Ok(n > 0)
    }

    /// Resumes `target`: its held jobs go back to their queues through the delayed-job
    /// sweeper, in the order they arrived. Answers how many, or `None` when it was not paused.
    pub fn resume(&self, target: &str) -> Result<Option<u64>, StorageError> {
        if self.exec("DELETE FROM pauses WHERE target = ?1", params![target])? == 0 {
            return Ok(None);
        }
        self.exec(
            "UPDATE jobs SET state = 'scheduled'
             WHERE state = 'paused' AND id IN (SELECT job_id FROM paused_jobs WHERE target = ?1)",
            params![target],
        )?;
        // Due at their arrival number: long past, and sent back in that order.
        let n = self.exec(
            "INSERT INTO scheduled (job_id, due_ms, envelope)
             SELECT job_id, seq, envelope FROM paused_jobs WHERE target = ?1
             ON CONFLICT(job_id) DO UPDATE SET due_ms = excluded.due_ms, released = 0, claimed_until_ms = 0,
                 envelope = excluded.envelope",
            params![target],
        )?;
        self.exec("DELETE FROM paused_jobs WHERE target = ?1", params![target])?;
        Ok(Some(n as u64))
    }

    /// Holds job `id` (its message `envelope`) for the pause of `target`.
    pub fn hold_paused(&self, target: &str, id: &JobId, envelope: &[u8]) -> Result<(), StorageError> {
        self.write(
            "INSERT INTO paused_jobs (target, job_id, envelope) VALUES (?1, ?2, ?3) ON CONFLICT(job_id) DO NOTHING",
            params![target, id.as_str(), envelope],
        )
    }

    /// A paused job its client cancelled goes back to its queue at once, to be decided
    /// `cancelled` there.
    pub(super) fn release_paused(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec(
            "UPDATE jobs SET state = 'scheduled' WHERE id = ?1 AND state = 'paused'",
            params![id.as_str()],
        )?;
        self.exec(
            "INSERT INTO scheduled (job_id, due_ms, envelope)
             SELECT job_id, 0, envelope FROM paused_jobs WHERE job_id = ?1
             ON CONFLICT(job_id) DO NOTHING",
            params![id.as_str()],
        )?;
        self.exec("DELETE FROM paused_jobs WHERE job_id = ?1", params![id.as_str()])?;
        Ok(())
    }

    /// The pauses in force, with the jobs each holds.
    pub fn pauses(&self) -> Result<Vec<Pause>, StorageError> {
        self.rows(
            "SELECT p.target, p.since_ms, (SELECT COUNT(*) FROM paused_jobs h WHERE h.target = p.target)
             FROM pauses p ORDER BY p.target",
            params![],
        )?
        .iter()
        .map(|r| Ok(Pause { target: r.get(0)?, since_ms: r.get(1)?, held: r.get::<i64>(2)?.unsigned_abs() }))
        .collect()
    }

    /// Jobs held in storage, by kind and state: delayed (`scheduled`), `throttled`,
    /// `waiting_for_turn` and `paused`.
    pub fn held_by_kind(&self) -> Result<Vec<(String, String, u64)>, StorageError> {
        self.rows(
            "SELECT j.kind, j.state, COUNT(*) FROM scheduled s JOIN jobs j ON j.id = s.job_id GROUP BY j.kind, j.state
             UNION ALL
             SELECT j.kind, 'waiting_for_turn', COUNT(*) FROM singleton_waiting w JOIN jobs j ON j.id = w.job_id
             GROUP BY j.kind
             UNION ALL
             SELECT j.kind, 'paused', COUNT(*) FROM paused_jobs h JOIN jobs j ON j.id = h.job_id GROUP BY j.kind",
            params![],
        )?
        .iter()
        .map(|r| Ok((r.get(0)?, r.get(1)?, r.get::<i64>(2)?.unsigned_abs())))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use crate::Store;

    /// A paused target holds jobs in arrival order; resuming sends them back due in that order
    /// and lifts the pause; a second pause or resume changes nothing.
    #[tokio::test]
    async fn a_pause_holds_jobs_and_a_resume_releases_them_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
        {
            store
                .transact(|tx| {
                    assert!(tx.pause("kind:k")?);
                    assert!(!tx.pause("kind:k")?);
                    for n in [3, 1, 2] {
                        tx.record_job(&job(n, JobState::Paused, None))?;
                        tx.hold_paused("kind:k", &id(n), &[n])?;
                    }
                    let listed = tx.pauses()?;
                    assert_eq!((listed[0].target.as_str(), listed[0].held), ("kind:k", 3));
                    let probe = tx.probe_paused(&id(9), ["kind:k", "queue:q"])?;
                    assert_eq!(probe.paused.as_deref(), Some("kind:k"));
                    assert_eq!(tx.probe_paused(&id(9), ["kind:other", "queue:q"])?.paused, None);
                    assert_eq!(tx.resume("kind:k")?, Some(3));
                    assert_eq!(tx.resume("kind:k")?, None);
                    assert!(tx.pauses()?.is_empty());
                    let due: Vec<Vec<u8>> = tx
                        .rows("SELECT envelope FROM scheduled ORDER BY due_ms", params![])?
                        .iter()
                        .map(|r| r.get(0))
                        .collect::<Result<_, _>>()?;
                    assert_eq!(due, [vec![3], vec![1], vec![2]], "in arrival order");
                    assert_eq!(tx.job(&id(1))?.map(|j| j.state), Some(JobState::Scheduled));
                    Ok::<_, crate::StorageError>(())
                })
                .await
                .unwrap();
        }
    }
}
