//! Recording outcomes: a storage handler's run, an external handler's outcome, the parked
//! successors either releases, and a dead letter.

use gatehouse_protocol::{Catalog, JobEnvelope, JobState, JobStatus};
use gatehouse_storage::{StorageError, Tx};

use super::{Answer, ApplyError, answer, lock, record, status_from, status_of, stored};
use crate::handlers::{Kinds, Outcome};
use crate::reasons::DeadReason;
use crate::security::{ReplyTarget, Sessions};

/// What running storage handlers and their parked successors needs.
pub struct Run<'a> {
    pub catalog: &'a Catalog,
    pub kinds: &'a Kinds,
    pub sessions: &'a Sessions,
}

impl Run<'_> {
    /// Runs a storage handler and records its outcome, then any parked successors it releases
    /// ([`prepare`] has just found the job undecided, in the same transaction).
    ///
    /// # Errors
    /// [`ApplyError::Retry`] when the handler asks to be retried or overran its timeout
    /// (everything rolls back), or a storage failure.
    pub(super) fn in_storage(
        &self,
        tx: &Tx<'_>,
        env: &JobEnvelope,
        target: &ReplyTarget,
        attempt: u32,
        timeout: std::time::Duration,
        known: super::prepare::Known,
    ) -> Result<Vec<Answer>, ApplyError> {
        match self.kinds.run_in_storage(tx, env, attempt, timeout, Some(known.cancelled))? {
            Outcome::Retryable(e) => Err(ApplyError::Retry(e)),
            outcome => Ok(self.record_undecided(tx, env, outcome, target, known.fresh)?),
        }
    }

    /// Records what an external handler decided (success or permanent failure), unless another
    /// delivery of the job decided it meanwhile; for sequenced jobs, advances the sequence and
    /// runs the parked successors (stored sealed; `sessions` opens them).
    ///
    /// # Errors
    /// Only storage failures.
    pub fn record_outcome(
        &self,
        tx: &Tx<'_>,
        env: &JobEnvelope,
        outcome: Outcome,
        target: &ReplyTarget,
    ) -> Result<Vec<Answer>, StorageError> {
        lock(tx, self.catalog.kind(&env.kind).is_some_and(|k| k.sequenced), env)?;
        let probe = tx.probe(&env.id)?;
        if let Some(stored) = probe.job {
            return Ok(vec![answer(status_of(tx, stored)?, target)]);
        }
        // Cancelled while it ran: it ends cancelled, unless it got to the end.
        let outcome = match outcome {
            Outcome::Success(_) => outcome,
            _ if probe.cancelled => Outcome::Cancelled,
            _ => outcome,
        };
        self.record_undecided(tx, env, outcome, target, false)
    }

    /// [`Run::record_outcome`] for a job known to be undecided in this transaction.
    fn record_undecided(
        &self,
        tx: &Tx<'_>,
        env: &JobEnvelope,
        outcome: Outcome,
        target: &ReplyTarget,
        fresh: bool,
    ) -> Result<Vec<Answer>, StorageError> {
        let sequence = env
            .sequence
            .as_ref()
            .filter(|_| self.catalog.kind(&env.kind).is_some_and(|k| k.sequenced))
            .map(|s| (s.owned_key(&env.client), s.number()));
        let Some((key, number)) = sequence else {
            return Ok(vec![answer(record(tx, env, outcome, None, fresh)?, target)]);
        };
        let mut answers = vec![answer(record(tx, env, outcome, Some((key.clone(), number)), fresh)?, target)];
        let mut next = number + 1;
        while let Some(parked) = tx.take_parked(&key, next)? {
            tx.lock_job(&parked.job_id)?;
            let (env, target) = self
                .sessions
                .open_stored(&parked.envelope)
                .map_err(|e| StorageError::Corrupt(format!("parked job {}: {e}", parked.job_id)))?;
            // Successors run here, with their storage handlers (sequenced kinds have those); one
            // that asks for a retry is recorded as failed rather than holding its key.
            let timeout = std::time::Duration::from_millis(
                self.catalog.kind(&env.kind).map_or(u64::MAX / 2, |k| k.timeout_ms),
            );
            let outcome = match self.kinds.run_in_storage(tx, &env, 1, timeout, None)? {
                Outcome::Retryable(e) => Outcome::Permanent(e),
                o => o,
            };
            let status = record(tx, &env, outcome, Some((key.clone(), next)), false)?;
            answers.push(Answer { status, target });
            next += 1;
        }
        tx.set_next_expected(&key, next)?;
        Ok(answers)
    }
}

/// Records that `env` was dead-lettered with `reason`.
///
/// # Errors
/// Only storage failures.
pub fn record_dead(
    tx: &Tx<'_>,
    env: &JobEnvelope,
    reason: DeadReason,
    error: Option<String>,
) -> Result<JobStatus, StorageError> {
    tx.lock_job(&env.id)?;
    let sequence = env.sequence.as_ref().map(|s| (s.owned_key(&env.client), s.number()));
    let mut job = stored(env, JobState::DeadLettered, None, error, sequence);
    job.reason = Some(reason.as_str().to_owned());
    tx.record_job(&job)?;
    tx.on_decided(&env.id)?;
    Ok(status_from(job))
}
