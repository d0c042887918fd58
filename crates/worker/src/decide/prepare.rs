//! Dedupe, sequence, hold and count one delivery ([`prepare`], [`begin`]); a storage kind's
//! whole decision ([`decide_and_run`]).

use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::{Catalog, JobEnvelope, JobState, JobStatus, KindSpec};
use gatehouse_storage::{Forget, JobProbe, Parked, Probe, StorageError, StoredJob, Tx};

use super::{
    ApplyError, Arrival, Cap, Dead, Run, Started, Step, Verdict, answer, answered, hold, key_value, lock,
    record, turn,
};
use crate::handlers::{Kinds, Outcome};
use crate::reasons::DeadReason;
use crate::security::{ReplyTarget, Sessions};

/// For kinds whose handler runs inside storage: the whole decision and its effect in one
/// step — dedupe, sequence, run, record, release parked successors. Nothing is counted
/// before the run: the run and its outcome commit together or not at all, so no one can
/// see it started and undecided. A retry request or a panic undoes all of it (the caller
/// then records the failed attempt with [`Tx::record_failed_attempt`]).
///
/// # Errors
/// [`ApplyError::Retry`], or a storage failure.
pub fn decide_and_run(
    tx: &Tx<'_>,
    catalog: &Catalog,
    kinds: &Kinds,
    spec: &KindSpec,
    sessions: &Sessions,
    arrival: &Arrival,
) -> Result<Verdict, ApplyError> {
    let (step, probe) = prepare_probed(tx, spec, arrival)?;
    match step {
        Step::Decided(d) => Ok(d),
        Step::Run { .. } => {
            let attempt = probe.attempts.as_ref().map_or(1, |a| a.count + 1);
            let timeout = std::time::Duration::from_millis(spec.timeout_ms);
            let run = Run { catalog, kinds, sessions };
            // Nothing stored of it and no turn held: its outcome has nothing to clean up.
            let known = Known {
                cancelled: probe.cancelled,
                fresh: probe.is_fresh() && turn(spec, &arrival.env).is_none(),
            };
            run.in_storage(tx, &arrival.env, &arrival.target, attempt, timeout, known).map(Verdict::Answered)
        }
    }
}

/// What [`prepare`] found that running a storage handler can use.
#[derive(Debug, Clone, Copy)]
pub(super) struct Known {
    /// Its client cancelled it.
    pub cancelled: bool,
    /// Nothing was stored of it (see [`Probe::is_fresh`]) and it holds no singleton turn.
    pub fresh: bool,
}

/// Dedupe, sequence and count one delivery.
///
/// # Errors
/// Only storage failures, which roll the whole decision back.
pub fn prepare(tx: &Tx<'_>, spec: &KindSpec, arrival: &Arrival) -> Result<Step, StorageError> {
    prepare_probed(tx, spec, arrival).map(|(step, _)| step)
}

/// [`prepare`], answering what storage knew of the job too (read once, in one statement).
fn prepare_probed(tx: &Tx<'_>, spec: &KindSpec, arrival: &Arrival) -> Result<(Step, Probe), StorageError> {
    let env = &arrival.env;
    lock(tx, spec.sequenced, env)?;
    if let Some(grant) = &arrival.replay
        && tx.forget_dead_lettered(&env.id, grant.dead_count)? == Forget::GrantTooOld
    {
        // Its grant is for an earlier dead letter of the job than its latest: back to the
        // dead-letter queue, nothing recorded.
        tracing::warn!("replay refused: its grant is for an earlier dead letter of the job");
        let refused = Verdict::DeadLetter(Dead::unrecorded(DeadReason::ReplayRefused, None));
        return Ok((Step::Decided(refused), Probe::default()));
    }
    let due = env.not_before_ms.filter(|at| *at > now_ms().unsigned_abs());
    let JobProbe { pauses, .. } = probe_of(spec, env);
    let probe = tx.probe_paused(&env.id, [&pauses[0], &pauses[1]])?;
    let decided = match &probe.job {
        Some(stored) => known(tx, spec, arrival, stored.clone(), due, probe.cancelled)?,
        None => match due {
            Some(at) => Some(delay(tx, arrival, at)?),
            None => None,
        },
    };
    if let Some(verdict) = decided {
        return Ok((Step::Decided(verdict), probe));
    }
    let state = probe.job.as_ref().map(|j| j.state);
    if let Some(verdict) = super::parents::after_parents(tx, arrival, state, probe.cancelled)? {
        return Ok((Step::Decided(verdict), probe));
    }
    // (A cancelled job goes on, to be decided cancelled.)
    if let Some(target) = probe.paused.clone()
        && !probe.cancelled
    {
        return Ok((Step::Decided(pause(tx, arrival, &target)?), probe));
    }
    if spec.sequenced
        && let Some(verdict) = in_sequence(tx, spec, arrival)?
    {
        return Ok((Step::Decided(verdict), probe));
    }
    let reserved = probe.job.as_ref().is_some_and(|j| j.state == JobState::Throttled);
    if !reserved && let Some(verdict) = throttle(tx, spec, arrival)? {
        return Ok((Step::Decided(verdict), probe));
    }
    if let Some(verdict) = wait_for_turn(tx, spec, arrival)? {
        return Ok((Step::Decided(verdict), probe));
    }
    let step = match &probe.attempts {
        Some(a) if a.count >= spec.max_attempts => Step::Decided(exhausted(a.count, a.last_error.clone())),
        before => Step::Run { suspect: before.as_ref().is_some_and(|a| a.running) },
    };
    Ok((step, probe))
}

/// What deciding about a delivery of `env` does first: lock the job and probe it with its
/// kind's and queue class's pause targets (for [`gatehouse_storage::Store::transact_on`], which
/// reads it ahead on PostgreSQL).
pub fn probe_of(spec: &KindSpec, env: &JobEnvelope) -> JobProbe {
    JobProbe { id: env.id.clone(), pauses: [format!("kind:{}", spec.name), format!("queue:{}", spec.queue)] }
}

/// A job storage knows already. `None`: it goes on (a delayed job whose time came, a singleton
/// job whose turn came); otherwise its stored status is the answer.
fn known(
    tx: &Tx<'_>,
    spec: &KindSpec,
    arrival: &Arrival,
    stored: StoredJob,
    due: Option<u64>,
    cancelled: bool,
) -> Result<Option<Verdict>, StorageError> {
    let (env, target) = (&arrival.env, &arrival.target);
    match stored.state {
        // Its time has come: the held copy came back (or the original, redelivered late).
        JobState::Scheduled if due.is_none() || cancelled => {
            tx.unschedule(&env.id)?;
            Ok(None)
        }
        // A throttled job whose reserved start came (or a copy of it, early: it waits).
        JobState::Throttled => match tx.scheduled_due(&env.id)? {
            Some(at) if at > now_ms().unsigned_abs() && !cancelled => answered(tx, stored, target).map(Some),
            _ => {
                tx.unschedule(&env.id)?;
                Ok(None)
            }
        },
        // Its parents may be decided now (its message was sent back when they were): see
        // `after_parents`, next.
        JobState::WaitingForParents => Ok(None),
        // A singleton job whose turn may have come (its message was sent back when it did).
        JobState::WaitingForTurn => {
            let key = turn(spec, env);
            let mine = match &key {
                Some((key, limit)) => tx.take_turn(key, &env.id, &arrival.raw, *limit)?,
                // No longer a singleton kind (the catalog changed): it runs.
                None => true,
            };
            if !mine {
                return answered(tx, stored, target).map(Some);
            }
            if key.is_some()
                && let Some(running) = hold_turn(tx, arrival)?
            {
                return Ok(Some(running));
            }
            tx.turn_taken(&env.id)?;
            Ok(None)
        }
        _ => answered(tx, stored, target).map(Some),
    }
}

/// A delayed job: held in storage until its time, then sent back to its queue (the `delayed`
/// sweeper).
fn delay(tx: &Tx<'_>, arrival: &Arrival, at: u64) -> Result<Verdict, StorageError> {
    let env = &arrival.env;
    if tx.delayed_count_of(&env.client)? >= arrival.caps.delayed {
        return Ok(Cap::Delayed.verdict(&env.client, &arrival.caps));
    }
    hold(tx, env, JobState::Scheduled, None)?;
    tx.schedule(&env.id, at, &arrival.raw)?;
    let mut status = JobStatus::new(env.id.clone(), JobState::Scheduled);
    status.not_before = Some(gatehouse_protocol::submit::format_rfc3339_ms(at));
    Ok(Verdict::Answered(vec![answer(status, &arrival.target)]))
}

/// A kind with a start rate: its next start is reserved (in storage, so across workers); a job
/// whose reserved start is later is held until then, unstarted (`throttled`), and comes back
/// through the delayed-job sweeper. Jobs keep their arrival order: each reserves the next start.
fn throttle(tx: &Tx<'_>, spec: &KindSpec, arrival: &Arrival) -> Result<Option<Verdict>, StorageError> {
    let Some(rate) = spec.start_rate() else { return Ok(None) };
    let env = &arrival.env;
    let key = match &rate.per_key {
        Some(field) => format!("{}\u{1f}{}", spec.name, key_value(env, field)),
        None => spec.name.clone(),
    };
    let now_us = now_ms().saturating_mul(1000);
    let start_us = tx.reserve_start(&key, now_us, rate.interval_us, rate.burst)?;
    if start_us <= now_us {
        return Ok(None);
    }
    let at = (start_us / 1000).unsigned_abs();
    hold(tx, env, JobState::Throttled, None)?;
    tx.schedule(&env.id, at, &arrival.raw)?;
    let mut status = JobStatus::new(env.id.clone(), JobState::Throttled);
    status.not_before = Some(gatehouse_protocol::submit::format_rfc3339_ms(at));
    Ok(Some(Verdict::Answered(vec![answer(status, &arrival.target)])))
}

/// An operator paused its kind or queue class: held, unstarted, until `gatehouse resume`
/// sends it back to its queue.
fn pause(tx: &Tx<'_>, arrival: &Arrival, target: &str) -> Result<Verdict, StorageError> {
    let env = &arrival.env;
    hold(tx, env, JobState::Paused, None)?;
    tx.hold_paused(target, &env.id, &arrival.raw)?;
    let status = JobStatus::new(env.id.clone(), JobState::Paused);
    Ok(Verdict::Answered(vec![answer(status, &arrival.target)]))
}

/// A sequenced job: `None` when it is its key's next number; otherwise parked, or failed
/// (no sequence, or a number another job holds).
fn in_sequence(tx: &Tx<'_>, spec: &KindSpec, arrival: &Arrival) -> Result<Option<Verdict>, StorageError> {
    let (env, target) = (&arrival.env, &arrival.target);
    let failed = |error: String| -> Result<Option<Verdict>, StorageError> {
        let status = record(tx, env, Outcome::Permanent(error), None, false)?;
        Ok(Some(Verdict::Answered(vec![answer(status, target)])))
    };
    let Some(seq) = &env.sequence else {
        return failed(format!("{} needs a sequence", env.kind));
    };
    let owned = seq.owned_key(&env.client);
    let (key, number) = (owned.as_str(), seq.number());
    let expected = tx.next_expected(key)?;
    if number < expected || tx.sequence_holder(key, number)?.is_some() {
        return failed(format!("sequence_conflict: number {number} of {key} belongs to another job"));
    }
    if number == expected {
        return Ok(None);
    }
    if tx.parked_count_of(&env.client)? >= arrival.caps.parked {
        return Ok(Some(Cap::Parked.verdict(&env.client, &arrival.caps)));
    }
    hold(tx, env, JobState::WaitingForSequence, Some((key.to_owned(), number)))?;
    tx.park(&Parked {
        job_id: env.id.clone(),
        seq_key: key.to_owned(),
        seq_number: number,
        envelope: arrival.raw.clone(),
        reply_to: target.reply.as_ref().map(|r| r.queue.clone()),
        correlation_id: target.reply.as_ref().map(|r| r.correlation_id.clone()),
        deadline_ms: now_ms().saturating_add((spec.gap_timeout_s * 1000) as i64),
    })?;
    let mut status = JobStatus::new(env.id.clone(), JobState::WaitingForSequence);
    status.expected = Some(expected);
    Ok(Some(Verdict::Answered(vec![answer(status, target)])))
}

/// One at a time per singleton key: the others wait their turn, in order, unstarted. `None`:
/// not a singleton kind, or the turn is this job's and its attempt holds the turn's lease.
fn wait_for_turn(tx: &Tx<'_>, spec: &KindSpec, arrival: &Arrival) -> Result<Option<Verdict>, StorageError> {
    let env = &arrival.env;
    let Some((key, limit)) = turn(spec, env) else { return Ok(None) };
    if tx.take_turn(&key, &env.id, &arrival.raw, limit)? {
        return hold_turn(tx, arrival);
    }
    // Now in line; its own record comes below, so the count is of the others.
    if tx.waiting_count_of(&env.client)? >= arrival.caps.waiting {
        tx.stop_waiting(&env.id)?;
        return Ok(Some(Cap::Waiting.verdict(&env.client, &arrival.caps)));
    }
    hold(tx, env, JobState::WaitingForTurn, None)?;
    let status = JobStatus::new(env.id.clone(), JobState::WaitingForTurn);
    Ok(Some(Verdict::Answered(vec![answer(status, &arrival.target)])))
}

/// Takes the lease of `env`'s turn for this attempt: `Some` (the answer to give instead of
/// running) when another attempt holds it and it has not run out.
fn hold_turn(tx: &Tx<'_>, arrival: &Arrival) -> Result<Option<Verdict>, StorageError> {
    let Some(lease) = &arrival.turn_lease else { return Ok(None) };
    let env = &arrival.env;
    if tx.lease_turn(&env.id, &arrival.raw, lease.expires_at_ms, &lease.holder, now_ms())? {
        return Ok(None);
    }
    let running = JobStatus::new(env.id.clone(), JobState::Running);
    Ok(Some(Verdict::Answered(vec![answer(running, &arrival.target)])))
}

/// Started `attempts` times without an outcome (crashes): dead-lettered.
fn exhausted(attempts: u32, last_error: Option<String>) -> Verdict {
    let error = last_error.unwrap_or_else(|| "the worker stopped while running it".into());
    Verdict::DeadLetter(Dead { reason: DeadReason::MaxAttempts, error: Some(error), attempts, record: true })
}

/// Counts the start of an attempt, once the consumer holds its isolation lock. Answers the
/// attempt, or the verdict to act on instead when another copy of the delivery got there
/// first (it decided the job, or used up its attempts).
///
/// # Errors
/// Only storage failures.
pub fn begin(
    tx: &Tx<'_>,
    spec: &KindSpec,
    env: &JobEnvelope,
    target: &ReplyTarget,
) -> Result<Result<Started, Verdict>, StorageError> {
    tx.lock_job(&env.id)?;
    let probe = tx.probe(&env.id)?;
    if let Some(stored) = probe.job {
        return answered(tx, stored, target).map(Err);
    }
    if probe.cancelled {
        let status = record(tx, env, Outcome::Cancelled, None, false)?;
        return Ok(Err(Verdict::Answered(vec![answer(status, target)])));
    }
    if let Some(a) = probe.attempts.filter(|a| a.count >= spec.max_attempts) {
        return Ok(Err(exhausted(a.count, a.last_error)));
    }
    let attempt = tx.begin_attempt(&env.id, &env.client)?;
    Ok(Ok(Started { attempt, checkpoint: tx.checkpoint(&env.id, &env.client)? }))
}
