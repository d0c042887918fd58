//! The decisions about one job, each taken inside one storage transaction.
//!
//! 1. [`prepare`] — **dedupe**: a job id already stored is a redelivery, a client retry or a
//!    replay: no second effect, the stored outcome is answered. **Sequence**: for sequenced
//!    kinds exactly the key's next number runs; a later number is parked in storage (committed
//!    before the delivery is acked) until the gap closes; a number another job holds is a
//!    `sequence_conflict`. Otherwise the job runs. An external handler's attempt is
//!    **counted** first ([`Tx::begin_attempt`], committed before the handler runs), so that a
//!    crash while running counts and a delivery that was only prefetched does not; a storage
//!    handler's run commits together with its outcome, so it needs no count.
//! 2. [`decide_and_run`] / [`record_outcome`] — run the handler (or record what an external
//!    handler returned), record the outcome, and run parked successors the gap was holding.
//! 3. [`record_dead`] — a job that is dead-lettered, once the dead-letter queue confirmed it.
//!
//! Ordering rules: a job that fails permanently still uses up its sequence number (its outcome
//! is decided, so it cannot block its key); a job that is dead-lettered does not (nothing was
//! decided): its key waits until it is replayed, and later numbers dead-letter after the gap
//! timeout. Priority cannot overtake a sequence: a priority-9 job for number 5 parks until 4
//! applied.

use gatehouse_protocol::{Catalog, JobEnvelope, JobId, JobState, JobStatus, KindSpec};
use gatehouse_storage::{Forget, Parked, StorageError, StoredJob, Tx, now_ms};

use crate::handlers::{Kinds, Outcome};
use crate::keys::Sessions;
pub use crate::reply::ReplyTarget;

/// A status to send to a reply target.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: JobStatus,
    pub target: ReplyTarget,
}

/// A decision that needs no handler run.
#[derive(Debug, Clone, PartialEq)]
pub enum Decided {
    /// Decided without running anything (duplicate, parked, conflict): the answers to send.
    Done(Vec<Answer>),
    /// Started `attempts` times without an outcome (crashes): dead-letter it.
    Exhausted { attempts: u32, last_error: Option<String> },
    /// A replay whose grant is for an earlier dead letter of the job than its latest: back to the
    /// dead-letter queue, nothing recorded.
    ReplayRefused,
    /// It would be held (parked, delayed, waiting for its turn), but its client already holds
    /// the most such jobs allowed: dead-letter it (`parked_limit`, `delayed_limit`,
    /// `waiting_limit`), recorded but not using up a sequence number, so that a replay can run
    /// it.
    OverCap(Cap),
}

/// What a client may hold in the worker's storage at most, per kind of holding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCaps {
    /// Jobs waiting for an earlier sequence number.
    pub parked: u64,
    /// Delayed jobs held until they are due.
    pub delayed: u64,
    /// Jobs waiting for a singleton turn.
    pub waiting: u64,
}

impl Default for ClientCaps {
    fn default() -> Self {
        Self { parked: 10_000, delayed: 10_000, waiting: 10_000 }
    }
}

/// Which of [`ClientCaps`] a job ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Parked,
    Delayed,
    Waiting,
}

impl Cap {
    /// The dead-letter reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Parked => "parked_limit",
            Self::Delayed => "delayed_limit",
            Self::Waiting => "waiting_limit",
        }
    }

    /// What the client holds too many of, in words.
    pub fn holding(self) -> &'static str {
        match self {
            Self::Parked => "jobs waiting for earlier sequence numbers",
            Self::Delayed => "delayed jobs",
            Self::Waiting => "jobs waiting for a singleton turn",
        }
    }

    /// The cap in `caps`.
    pub fn of(self, caps: &ClientCaps) -> u64 {
        match self {
            Self::Parked => caps.parked,
            Self::Delayed => caps.delayed,
            Self::Waiting => caps.waiting,
        }
    }
}

/// What [`prepare`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Decided(Decided),
    /// Run the handler (after counting the attempt with [`begin`]). `suspect`: the previous
    /// attempt was interrupted by the death of the worker process, maybe caused by this very
    /// job, so it runs alone (see [`crate::consumer`]).
    Run {
        suspect: bool,
    },
}

/// One delivery of a job, as the decisions need it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The job, its payload opened.
    pub env: JobEnvelope,
    /// The message body as it arrived (sealed, vouched for): what a parked job keeps.
    pub raw: Vec<u8>,
    pub target: ReplyTarget,
    /// An operator's verified replay grant: forget that the job was dead-lettered, if the
    /// grant is for its latest dead letter.
    pub replay: Option<gatehouse_protocol::replay::Grant>,
    /// What its client may hold at most.
    pub caps: ClientCaps,
    /// For an external kind: the lease its attempt would hold (see [`hold_turn`]).
    pub turn_lease: Option<TurnLease>,
}

/// The lease an attempt of a singleton job takes with its turn: the turn is the job's, but
/// only the attempt holding this lease runs it (a second copy of the message while it runs is
/// answered `running`, never run beside it; a worker that dies lets the lease run out).
#[derive(Debug, Clone)]
pub struct TurnLease {
    pub holder: String,
    pub expires_at_ms: i64,
}

/// Takes the lease of `env`'s turn for this attempt: `Some` (the answer to give instead of
/// running) when another attempt holds it and it has not run out.
fn hold_turn(tx: &Tx<'_>, arrival: &Arrival) -> Result<Option<Decided>, StorageError> {
    let Some(lease) = &arrival.turn_lease else { return Ok(None) };
    let env = &arrival.env;
    if tx.lease_turn(&env.id, &arrival.raw, lease.expires_at_ms, &lease.holder, now_ms())? {
        return Ok(None);
    }
    let running = JobStatus::new(env.id.clone(), JobState::Running);
    Ok(Some(Decided::Done(vec![answer(running, &arrival.target)])))
}

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
) -> Result<Decided, ApplyError> {
    match prepare(tx, spec, arrival)? {
        Step::Decided(d) => Ok(d),
        Step::Run { .. } => {
            let attempt = tx.attempts(&arrival.env.id)?.map_or(1, |a| a.count + 1);
            let timeout = std::time::Duration::from_millis(spec.timeout_ms);
            let run = Run { catalog, kinds, sessions };
            run.in_storage(tx, &arrival.env, &arrival.target, attempt, timeout).map(Decided::Done)
        }
    }
}

/// What running storage handlers and their parked successors needs.
pub struct Run<'a> {
    pub catalog: &'a Catalog,
    pub kinds: &'a Kinds,
    pub sessions: &'a Sessions,
}

/// Why a storage handler's transaction was rolled back.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The handler asked to be tried again later.
    #[error("{0}")]
    Retry(String),
}

/// Dedupe, sequence and count one delivery.
///
/// # Errors
/// Only storage failures, which roll the whole decision back.
pub fn prepare(tx: &Tx<'_>, spec: &KindSpec, arrival: &Arrival) -> Result<Step, StorageError> {
    let Arrival { env, raw, target, replay, .. } = arrival;
    lock(tx, spec.sequenced, env)?;
    if let Some(grant) = replay
        && tx.forget_dead_lettered(&env.id, grant.dead_count)? == Forget::GrantTooOld
    {
        return Ok(Step::Decided(Decided::ReplayRefused));
    }
    let due = env.not_before_ms.filter(|at| *at > now_ms() as u64);
    match tx.job(&env.id)? {
        // Its time has come: the held copy came back (or the original, redelivered late).
        Some(stored)
            if stored.state == JobState::Scheduled && (due.is_none() || tx.is_cancelled(&env.id)?) =>
        {
            tx.unschedule(&env.id)?;
        }
        // A singleton job whose turn may have come (its message was sent back when it did).
        Some(stored) if stored.state == JobState::WaitingForTurn => {
            let mine = match singleton_key(spec, env) {
                Some(key) => tx.take_turn(&key, &env.id, raw)?,
                // No longer a singleton kind (the catalog changed): it runs.
                None => true,
            };
            if !mine {
                return Ok(Step::Decided(Decided::Done(vec![answer(status_of(tx, stored)?, target)])));
            }
            if singleton_key(spec, env).is_some()
                && let Some(running) = hold_turn(tx, arrival)?
            {
                return Ok(Step::Decided(running));
            }
            tx.turn_taken(&env.id)?;
        }
        Some(stored) => {
            return Ok(Step::Decided(Decided::Done(vec![answer(status_of(tx, stored)?, target)])));
        }
        // A delayed job: held in storage until its time, then sent back to its queue
        // ([`crate::delays`]).
        None => {
            if let Some(at) = due {
                if tx.delayed_count_of(&env.client)? >= arrival.caps.delayed {
                    return Ok(Step::Decided(Decided::OverCap(Cap::Delayed)));
                }
                tx.record_job(&stored(env, JobState::Scheduled, None, None, None))?;
                tx.schedule(&env.id, at, raw)?;
                let mut status = JobStatus::new(env.id.clone(), JobState::Scheduled);
                status.not_before = Some(gatehouse_protocol::submit::format_rfc3339_ms(at));
                return Ok(Step::Decided(Decided::Done(vec![answer(status, target)])));
            }
        }
    }
    if spec.sequenced {
        let Some(seq) = &env.sequence else {
            let error = format!("{} needs a sequence", env.kind);
            let status = record(tx, env, Outcome::Permanent(error), None)?;
            return Ok(Step::Decided(Decided::Done(vec![answer(status, target)])));
        };
        let owned = seq.owned_key(&env.client);
        let (key, number) = (owned.as_str(), seq.number());
        let expected = tx.next_expected(key)?;
        if number < expected || tx.sequence_holder(key, number)?.is_some() {
            let error = format!("sequence_conflict: number {number} of {key} belongs to another job");
            let status = record(tx, env, Outcome::Permanent(error), None)?;
            return Ok(Step::Decided(Decided::Done(vec![answer(status, target)])));
        }
        if number > expected {
            if tx.parked_count_of(&env.client)? >= arrival.caps.parked {
                return Ok(Step::Decided(Decided::OverCap(Cap::Parked)));
            }
            let seq = Some((key.to_owned(), number));
            tx.record_job(&stored(env, JobState::WaitingForSequence, None, None, seq))?;
            tx.park(&Parked {
                job_id: env.id.clone(),
                seq_key: key.to_owned(),
                seq_number: number,
                envelope: raw.to_vec(),
                reply_to: target.reply.as_ref().map(|r| r.queue.clone()),
                correlation_id: target.reply.as_ref().map(|r| r.correlation_id.clone()),
                deadline_ms: now_ms().saturating_add((spec.gap_timeout_s * 1000) as i64),
            })?;
            let mut status = JobStatus::new(env.id.clone(), JobState::WaitingForSequence);
            status.expected = Some(expected);
            return Ok(Step::Decided(Decided::Done(vec![answer(status, target)])));
        }
    }
    // One at a time per singleton key: the others wait their turn, in order, unstarted.
    if let Some(key) = singleton_key(spec, env)
        && !tx.take_turn(&key, &env.id, raw)?
    {
        // Now in line; its own record comes below, so the count is of the others.
        if tx.waiting_count_of(&env.client)? >= arrival.caps.waiting {
            tx.stop_waiting(&env.id)?;
            return Ok(Step::Decided(Decided::OverCap(Cap::Waiting)));
        }
        tx.record_job(&stored(env, JobState::WaitingForTurn, None, None, None))?;
        let status = JobStatus::new(env.id.clone(), JobState::WaitingForTurn);
        return Ok(Step::Decided(Decided::Done(vec![answer(status, target)])));
    }
    if singleton_key(spec, env).is_some()
        && let Some(running) = hold_turn(tx, arrival)?
    {
        return Ok(Step::Decided(running));
    }
    match tx.attempts(&env.id)? {
        Some(a) if a.count >= spec.max_attempts => {
            Ok(Step::Decided(Decided::Exhausted { attempts: a.count, last_error: a.last_error }))
        }
        before => Ok(Step::Run { suspect: before.is_some_and(|a| a.running) }),
    }
}

/// An attempt counted by [`begin`]: its number, and the checkpoint an earlier attempt saved.
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    pub attempt: u32,
    pub checkpoint: Option<serde_json::Value>,
}

/// Counts the start of an attempt, once the consumer holds its isolation lock. Answers the
/// attempt, or the step to take instead when another copy of the delivery got there first
/// (it decided the job, or used up its attempts).
///
/// # Errors
/// Only storage failures.
pub fn begin(
    tx: &Tx<'_>,
    spec: &KindSpec,
    env: &JobEnvelope,
    target: &ReplyTarget,
) -> Result<Result<Started, Decided>, StorageError> {
    tx.lock_job(&env.id)?;
    if let Some(stored) = tx.job(&env.id)? {
        return Ok(Err(Decided::Done(vec![answer(status_of(tx, stored)?, target)])));
    }
    if tx.is_cancelled(&env.id)? {
        return Ok(Err(Decided::Done(vec![answer(record(tx, env, Outcome::Cancelled, None)?, target)])));
    }
    if let Some(a) = tx.attempts(&env.id)?.filter(|a| a.count >= spec.max_attempts) {
        return Ok(Err(Decided::Exhausted { attempts: a.count, last_error: a.last_error }));
    }
    let attempt = tx.begin_attempt(&env.id, &env.client)?.0;
    Ok(Ok(Started { attempt, checkpoint: tx.checkpoint(&env.id, &env.client)? }))
}

impl Run<'_> {
    /// Runs a storage handler and records its outcome, then any parked successors it releases
    /// ([`prepare`] has just found the job undecided, in the same transaction).
    ///
    /// # Errors
    /// [`ApplyError::Retry`] when the handler asks to be retried or overran its timeout
    /// (everything rolls back), or a storage failure.
    fn in_storage(
        &self,
        tx: &Tx<'_>,
        env: &JobEnvelope,
        target: &ReplyTarget,
        attempt: u32,
        timeout: std::time::Duration,
    ) -> Result<Vec<Answer>, ApplyError> {
        match self.kinds.run_in_storage(tx, env, attempt, timeout)? {
            Outcome::Retryable(e) => Err(ApplyError::Retry(e)),
            outcome => Ok(self.record_undecided(tx, env, outcome, target)?),
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
        if let Some(stored) = tx.job(&env.id)? {
            return Ok(vec![answer(status_of(tx, stored)?, target)]);
        }
        // Cancelled while it ran: it ends cancelled, unless it got to the end.
        let outcome = match outcome {
            Outcome::Success(_) => outcome,
            _ if tx.is_cancelled(&env.id)? => Outcome::Cancelled,
            _ => outcome,
        };
        self.record_undecided(tx, env, outcome, target)
    }

    /// [`Run::record_outcome`] for a job known to be undecided in this transaction.
    fn record_undecided(
        &self,
        tx: &Tx<'_>,
        env: &JobEnvelope,
        outcome: Outcome,
        target: &ReplyTarget,
    ) -> Result<Vec<Answer>, StorageError> {
        let sequence = env
            .sequence
            .as_ref()
            .filter(|_| self.catalog.kind(&env.kind).is_some_and(|k| k.sequenced))
            .map(|s| (s.owned_key(&env.client), s.number()));
        let Some((key, number)) = sequence else {
            return Ok(vec![answer(record(tx, env, outcome, None)?, target)]);
        };
        let mut answers = vec![answer(record(tx, env, outcome, Some((key.clone(), number)))?, target)];
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
            let outcome = match self.kinds.run_in_storage(tx, &env, 1, timeout)? {
                Outcome::Retryable(e) => Outcome::Permanent(e),
                o => o,
            };
            let status = record(tx, &env, outcome, Some((key.clone(), next)))?;
            answers.push(Answer { status, target });
            next += 1;
        }
        tx.set_next_expected(&key, next)?;
        Ok(answers)
    }
}

/// Serializes the decisions about `env` with those of other workers sharing the storage (see
/// [`Tx::lock`]): its sequence key first (for a sequenced kind), then the job. Two workers
/// holding numbers 4 and 5 of one key take turns, so the second sees what the first applied
/// and never parks a number whose gap just closed; two deliveries of one job take turns, so
/// the second finds the first's outcome.
fn lock(tx: &Tx<'_>, sequenced: bool, env: &JobEnvelope) -> Result<(), StorageError> {
    if sequenced && let Some(seq) = &env.sequence {
        tx.lock_sequence(&seq.owned_key(&env.client))?;
    }
    tx.lock_job(&env.id)
}

/// The turn a job of a singleton kind waits for: the kind's, or with `singleton_key` the
/// kind's and the client's value of that payload field.
fn singleton_key(spec: &KindSpec, env: &JobEnvelope) -> Option<String> {
    if let Some(field) = &spec.singleton_key {
        let value = env.payload.get(field).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
        let owned = gatehouse_protocol::submit::owned_key(&env.client, &value.unwrap_or_default());
        return Some(format!("{}\u{1f}{owned}", spec.name));
    }
    spec.singleton.then(|| spec.name.clone())
}

/// Records that `env` was dead-lettered with `reason`.
///
/// # Errors
/// Only storage failures.
pub fn record_dead(
    tx: &Tx<'_>,
    env: &JobEnvelope,
    reason: &str,
    error: Option<String>,
) -> Result<JobStatus, StorageError> {
    tx.lock_job(&env.id)?;
    let sequence = env.sequence.as_ref().map(|s| (s.owned_key(&env.client), s.number()));
    let mut job = stored(env, JobState::DeadLettered, None, error, sequence);
    job.reason = Some(reason.to_owned());
    tx.record_job(&job)?;
    tx.clear_attempts(&env.id)?;
    Ok(status_from(job))
}

/// The status of `id` for `client`: not found when it does not exist *or* is someone else's.
///
/// # Errors
/// Only storage failures.
pub fn status_for(tx: &Tx<'_>, id: &JobId, client: &str) -> Result<JobStatus, StorageError> {
    if let Some(job) = tx.job(id)? {
        return if job.client != client {
            Ok(JobStatus::new(id.clone(), JobState::NotFound))
        } else if !job.state.is_final() && tx.is_cancelled(id)? {
            // It will never run; its record says so once its message comes by.
            Ok(JobStatus::new(id.clone(), JobState::Cancelled))
        } else {
            status_of(tx, job)
        };
    }
    let running = tx.attempts(id)?.filter(|a| a.client == client).is_some_and(|a| a.running);
    if !running && tx.is_cancelled(id)? {
        return Ok(JobStatus::new(id.clone(), JobState::Cancelled));
    }
    Ok(match tx.attempts(id)? {
        Some(a) if a.client == client => {
            // Started but not decided: failed before and waiting in a retry queue, or running.
            let state = if a.last_error.is_some() { JobState::Retrying } else { JobState::Running };
            let mut s = JobStatus::new(id.clone(), state);
            s.error = a.last_error;
            s.progress = tx.progress(id, client)?.and_then(|v| serde_json::from_value(v).ok());
            s
        }
        _ => JobStatus::new(id.clone(), JobState::NotFound),
    })
}

/// A client's cancellation of `id`: marked in storage unless the job has ended (or is
/// another client's); answers its status afterwards — `cancelled`, `running` for one whose
/// handler is now told to stop, or the state it already ended in.
///
/// # Errors
/// Only storage failures.
pub fn cancel(tx: &Tx<'_>, id: &JobId, client: &str) -> Result<JobStatus, StorageError> {
    tx.lock_job(id)?;
    match tx.job(id)? {
        Some(job) if job.client != client => return Ok(JobStatus::new(id.clone(), JobState::NotFound)),
        Some(job) if job.state.is_final() => return status_of(tx, job),
        // Scheduled, parked, or not arrived yet (queued, retrying, running): ours to stop.
        _ => {}
    }
    if tx.attempts(id)?.is_some_and(|a| a.client != client) {
        return Ok(JobStatus::new(id.clone(), JobState::NotFound));
    }
    tx.mark_cancelled(id, client)?;
    let status = status_for(tx, id, client)?;
    if status.status == JobState::Cancelled {
        // It will never run: its stream ends here (a running one's ends with its outcome).
        tx.log_state(id, client, JobState::Cancelled)?;
    }
    Ok(status)
}

fn status_of(tx: &Tx<'_>, job: StoredJob) -> Result<JobStatus, StorageError> {
    let expected = match (job.state, &job.sequence) {
        (JobState::WaitingForSequence, Some((key, _))) => Some(tx.next_expected(key)?),
        _ => None,
    };
    let due = if job.state == JobState::Scheduled { tx.scheduled_due(&job.id)? } else { None };
    let mut status = status_from(job);
    status.expected = expected;
    if status.status == JobState::Scheduled {
        match due.filter(|at| *at > now_ms() as u64) {
            Some(at) => status.not_before = Some(gatehouse_protocol::submit::format_rfc3339_ms(at)),
            // Its time came: on its way back to its queue.
            None => status.status = JobState::Queued,
        }
    }
    Ok(status)
}

fn status_from(job: StoredJob) -> JobStatus {
    let mut status = JobStatus::new(job.id, job.state);
    status.result = job.result;
    status.error = job.error;
    status.reason = job.reason;
    status
}

fn answer(status: JobStatus, target: &ReplyTarget) -> Answer {
    Answer { status, target: target.clone() }
}

fn record(
    tx: &Tx<'_>,
    env: &JobEnvelope,
    outcome: Outcome,
    sequence: Option<(String, u64)>,
) -> Result<JobStatus, StorageError> {
    let job = match outcome {
        Outcome::Success(result) => stored(env, JobState::Succeeded, Some(result), None, sequence),
        Outcome::Permanent(e) | Outcome::Retryable(e) => {
            stored(env, JobState::Failed, None, Some(e), sequence)
        }
        Outcome::Cancelled => stored(env, JobState::Cancelled, None, None, sequence),
    };
    tx.record_job(&job)?;
    // Decided: its attempts (an external handler's) are history.
    tx.clear_attempts(&env.id)?;
    Ok(status_from(job))
}

fn stored(
    env: &JobEnvelope,
    state: JobState,
    result: Option<serde_json::Value>,
    error: Option<String>,
    sequence: Option<(String, u64)>,
) -> StoredJob {
    StoredJob {
        id: env.id.clone(),
        client: env.client.clone(),
        kind: env.kind.clone(),
        state,
        result,
        error,
        reason: None,
        sequence,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::{Arc, OnceLock};

    use gatehouse_protocol::crypto::{OpeningKey, Session, SigningKey, Verifier};
    use gatehouse_protocol::submit::{RawSequence, owned_key};
    use gatehouse_protocol::{Priority, Sequence, Vouched};
    use gatehouse_storage::Store;
    use serde_json::json;

    use super::*;

    fn kinds(catalog: &Catalog) -> Kinds {
        let mut registry = crate::handlers::Registry::builtins();
        crate::handlers::testing::register(&mut registry);
        Kinds { registry, schemas: gatehouse_protocol::schemas::Schemas::compile(catalog).unwrap() }
    }

    fn catalog() -> Catalog {
        Catalog::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml")).unwrap()
    }

    fn ledger_job(n: u8, number: u64, amount: i64) -> JobEnvelope {
        JobEnvelope {
            id: JobId::from_bytes([n; 16]),
            kind: "ledger.apply".into(),
            client: "c".into(),
            priority: Priority::new(3).unwrap(),
            sequence: Some(Sequence::parse(RawSequence { key: "acct".into(), number }).unwrap()),
            payload: json!({"account": "acct", "amount": amount}),
            submitted_at_ms: 0,
            not_before_ms: None,
            reply: None,
            trace_id: None,
        }
    }

    /// A gatekeeper session and the worker's side of it, shared by these tests.
    struct TestKeys {
        session: Session,
        sessions: Sessions,
    }

    fn keys() -> &'static TestKeys {
        static KEYS: OnceLock<TestKeys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let gk = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
            let worker = OpeningKey::from_bytes(&[7; 32]).unwrap();
            let session = Session::start(&gk, &worker.public_key(), 1).unwrap();
            let sessions = Sessions::new(Verifier::new([gk.public_key()]).unwrap(), worker);
            TestKeys { session, sessions }
        })
    }

    fn store(dir: &tempfile::TempDir) -> Store {
        let keyring = gatehouse_protocol::crypto::Keyring::parse(&format!("k1 {}", "ab".repeat(32))).unwrap();
        Store::open_sqlite(&dir.path().join("db"), keyring, crate::handlers::Registry::builtins().families())
            .unwrap()
    }

    /// Delivers `env` as the consumer would for a storage kind, without a broker.
    async fn deliver(store: &Store, env: JobEnvelope) -> Vec<Answer> {
        let catalog = catalog();
        let session = &keys().session;
        let raw = Vouched::wrap(session, &serde_json::to_vec(&env.seal(session).unwrap()).unwrap()).unwrap();
        store
            .transact(move |tx| -> Result<_, ApplyError> {
                let spec = catalog.kind(&env.kind).unwrap().clone();
                let target = ReplyTarget::default();
                let arrival =
                    Arrival { env, raw, target, replay: None, caps: ClientCaps::default(), turn_lease: None };
                match decide_and_run(tx, &catalog, &kinds(&catalog), &spec, &keys().sessions, &arrival)? {
                    Decided::Done(a) => Ok(a),
                    d => panic!("unexpected {d:?}"),
                }
            })
            .await
            .unwrap()
    }

    fn states(answers: &[Answer]) -> Vec<JobState> {
        answers.iter().map(|a| a.status.status).collect()
    }

    #[test]
    fn singleton_turns_are_per_kind_or_per_clients_own_key_value() {
        let catalog = catalog();
        let kind = catalog.kind("test.singleton").unwrap().clone();
        let env = |client: &str, group: &str| JobEnvelope {
            kind: "test.singleton".into(),
            client: client.into(),
            sequence: None,
            payload: json!({"ms": 1, "group": group}),
            ..ledger_job(1, 1, 0)
        };
        assert_eq!(singleton_key(&kind, &env("a", "x")), Some("test.singleton".into()));
        assert_eq!(
            singleton_key(&kind, &env("b", "y")),
            singleton_key(&kind, &env("a", "x")),
            "one per kind"
        );
        let by_group = KindSpec { singleton: false, singleton_key: Some("group".into()), ..kind.clone() };
        assert_eq!(singleton_key(&by_group, &env("a", "x")), singleton_key(&by_group, &env("a", "x")));
        assert_ne!(singleton_key(&by_group, &env("a", "x")), singleton_key(&by_group, &env("a", "y")));
        assert_ne!(
            singleton_key(&by_group, &env("a", "x")),
            singleton_key(&by_group, &env("b", "x")),
            "clients' values are their own"
        );
        let plain = KindSpec { singleton: false, ..kind };
        assert_eq!(singleton_key(&plain, &env("a", "x")), None);
    }

    #[tokio::test]
    async fn out_of_order_numbers_apply_in_order_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);

        let a = deliver(&store, ledger_job(3, 3, 100)).await;
        assert_eq!(states(&a), [JobState::WaitingForSequence]);
        assert_eq!(a[0].status.expected, Some(1));
        let a = deliver(&store, ledger_job(2, 2, 10)).await;
        assert_eq!(states(&a), [JobState::WaitingForSequence]);

        let a = deliver(&store, ledger_job(1, 1, 1)).await;
        assert_eq!(states(&a), [JobState::Succeeded; 3]);
        let balances: Vec<_> =
            a.iter().map(|a| a.status.result.as_ref().unwrap()["balance"].clone()).collect();
        assert_eq!(balances, [json!(1), json!(11), json!(111)]);

        // Redelivery of an applied job: same answer, no second effect.
        let again = deliver(&store, ledger_job(2, 2, 10)).await;
        assert_eq!(again[0].status.result.as_ref().unwrap()["balance"], json!(11));
        let (balance, seq) = store
            .transact(|tx| crate::handlers::ledger::balance_of(tx, &owned_key("c", "acct")))
            .await
            .unwrap();
        assert_eq!((balance, seq), (111, 3));
    }

    #[tokio::test]
    async fn another_job_claiming_a_used_number_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        deliver(&store, ledger_job(1, 1, 5)).await;
        let a = deliver(&store, ledger_job(9, 1, 500)).await;
        assert_eq!(states(&a), [JobState::Failed]);
        assert!(a[0].status.error.as_ref().unwrap().starts_with("sequence_conflict"));
        let (balance, _) = store
            .transact(|tx| crate::handlers::ledger::balance_of(tx, &owned_key("c", "acct")))
            .await
            .unwrap();
        assert_eq!(balance, 5);
    }

    #[tokio::test]
    async fn a_decided_job_keeps_no_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let attempts = |id: JobId| store.transact(move |tx| tx.attempts(&id));
        // A storage job that failed once (its count recorded apart), then succeeds.
        let env = ledger_job(1, 1, 5);
        let (id, client) = (env.id.clone(), env.client.clone());
        store.transact(move |tx| tx.record_failed_attempt(&id, &client, "busy")).await.unwrap();
        assert_eq!(attempts(env.id.clone()).await.unwrap().unwrap().count, 1);
        assert_eq!(states(&deliver(&store, env.clone()).await), [JobState::Succeeded]);
        assert_eq!(attempts(env.id.clone()).await.unwrap(), None);
        // A first-time storage job leaves none either.
        let env = ledger_job(2, 2, 5);
        deliver(&store, env.clone()).await;
        assert_eq!(attempts(env.id).await.unwrap(), None);
        // An external handler's counted attempt is forgotten once its outcome is recorded.
        let catalog = Arc::new(catalog());
        let env = JobEnvelope { kind: "test.sleep".into(), sequence: None, ..ledger_job(3, 1, 0) };
        let (id, client) = (env.id.clone(), env.client.clone());
        store.transact(move |tx| tx.begin_attempt(&id, &client)).await.unwrap();
        let recorded = store
            .transact(move |tx| {
                let target = ReplyTarget::default();
                let run = Run { catalog: &catalog, kinds: &kinds(&catalog), sessions: &keys().sessions };
                run.record_outcome(tx, &env, Outcome::Success(json!({})), &target)
            })
            .await
            .unwrap();
        assert_eq!(states(&recorded), [JobState::Succeeded]);
        assert_eq!(attempts(JobId::from_bytes([3; 16])).await.unwrap(), None);
    }

    #[tokio::test]
    async fn attempts_are_counted_before_running_and_exhaust() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let catalog = catalog();
        let mut spec = catalog.kind("vault.put").unwrap().clone();
        spec.max_attempts = 2;
        let env = JobEnvelope { kind: "vault.put".into(), sequence: None, ..ledger_job(7, 1, 0) };
        let step = |spec: KindSpec, env: JobEnvelope| {
            store.transact(move |tx| {
                let arrival = Arrival {
                    env,
                    raw: b"{}".to_vec(),
                    target: ReplyTarget::default(),
                    replay: None,
                    caps: ClientCaps::default(),
                    turn_lease: None,
                };
                prepare(tx, &spec, &arrival)
            })
        };
        // Two starts that never finished (crashes), then the third delivery is exhausted.
        let begin = |env: JobEnvelope| store.transact(move |tx| tx.begin_attempt(&env.id, &env.client));
        assert_eq!(step(spec.clone(), env.clone()).await.unwrap(), Step::Run { suspect: false });
        assert_eq!(begin(env.clone()).await.unwrap(), (1, false));
        assert_eq!(step(spec.clone(), env.clone()).await.unwrap(), Step::Run { suspect: true });
        assert_eq!(begin(env.clone()).await.unwrap(), (2, true));
        assert_eq!(
            step(spec.clone(), env.clone()).await.unwrap(),
            Step::Decided(Decided::Exhausted { attempts: 2, last_error: None })
        );
    }

    #[tokio::test]
    async fn status_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        deliver(&store, ledger_job(1, 1, 5)).await;
        let id = JobId::from_bytes([1; 16]);
        let (i2, i3) = (id.clone(), id.clone());
        let mine = store.transact(move |tx| status_for(tx, &i2, "c")).await.unwrap();
        assert_eq!(mine.status, JobState::Succeeded);
        let theirs = store.transact(move |tx| status_for(tx, &i3, "other")).await.unwrap();
        assert_eq!(theirs.status, JobState::NotFound);
    }
}
