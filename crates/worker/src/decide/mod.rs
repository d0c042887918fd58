//! The decisions about one job, each taken inside one storage transaction, each returning a
//! value the caller acts on — nothing here touches the broker, so every rule is unit-tested
//! against a real SQLite file without one.
//!
//! 1. [`prepare`] — **dedupe**: a job id already stored is a redelivery, a client retry or a
//!    replay: no second effect, the stored outcome is answered. **Sequence**: for sequenced
//!    kinds exactly the key's next number runs; a later number is parked in storage (committed
//!    before the delivery is acked) until the gap closes; a number another job holds is a
//!    `sequence_conflict`. Otherwise the job runs. An external handler's attempt is
//!    **counted** first ([`begin`], committed before the handler runs), so that a crash while
//!    running counts and a delivery that was only prefetched does not; a storage handler's run
//!    commits together with its outcome, so it needs no count.
//! 2. [`decide_and_run`] / [`Run::record_outcome`] — run the handler (or record what an
//!    external handler returned), record the outcome, and run parked successors the gap was
//!    holding.
//! 3. [`after_failure`] — a failed attempt: retried after a backoff, or dead-lettered.
//! 4. [`record_dead`] — a job that is dead-lettered, once the dead-letter queue confirmed it.
//! 5. [`status_for`], [`cancel`] — what a client asks about its job.
//! 6. [`hold_batch`], [`batch_status`] — a batch's (or workflow's) jobs recorded and held
//!    together, and what its client reads of it.
//! 7. `parents` — a job that waits for others (`after`) is held until they are decided, then
//!    runs or ends `cancelled` (`parent-failed`).
//!
//! Each ends in a [`Verdict`]: answered, retried, or dead-lettered with a [`DeadReason`].
//!
//! Ordering rules: a job that fails permanently still uses up its sequence number (its outcome
//! is decided, so it cannot block its key); a job that is dead-lettered does not (nothing was
//! decided): its key waits until it is replayed, and later numbers dead-letter after the gap
//! timeout. Priority cannot overtake a sequence: a priority-9 job for number 5 parks until 4
//! applied.

mod batch;
mod parents;
mod prepare;
mod record;
mod status;
#[cfg(test)]
mod tests;

use gatehouse_protocol::catalog::RunningLimit;
use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::{JobEnvelope, JobState, JobStatus, KindSpec};
use gatehouse_storage::{StorageError, StoredJob, Tx};

use crate::handlers::Outcome;
use crate::reasons::DeadReason;
use crate::security::ReplyTarget;
pub use batch::{batch_status, complete_batches, hold_batch, jobs_of};
pub use parents::PARENT_FAILED;
pub use prepare::{begin, decide_and_run, prepare, probe_of};
pub use record::{Run, record_dead};
pub use status::{cancel, status_for};

/// A status to send to a reply target.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: JobStatus,
    pub target: ReplyTarget,
}

/// What becomes of a delivery once decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Decided, or held in storage (duplicate, parked, scheduled, waiting, conflict): these
    /// answers go out, then the delivery is acked.
    Answered(Vec<Answer>),
    /// A failed attempt with attempts left: to a retry queue for `delay_ms`, then acked.
    Retry { attempt: u32, delay_ms: u64, error: String },
    /// To the dead-letter queue.
    DeadLetter(Dead),
}

/// Why and how a message is dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct Dead {
    pub reason: DeadReason,
    /// What went wrong, for the job's owner (sealed at rest; only its class leaves the worker).
    pub error: Option<String>,
    pub attempts: u32,
    /// Whether the job is recorded `dead_lettered` (a verified job of this worker); otherwise
    /// nothing is recorded (a refused message, a replay whose grant is too old).
    pub record: bool,
}

impl Dead {
    /// A message that is only sent on, nothing recorded.
    pub fn unrecorded(reason: DeadReason, error: Option<String>) -> Self {
        Self { reason, error, attempts: 0, record: false }
    }
}

/// Longest retry delay, however many attempts came before.
pub const MAX_RETRY_DELAY_MS: u64 = 5 * 60 * 1000;

/// After attempt `attempt` of a job of `spec` failed with `error`: a retry with exponential
/// backoff, or a dead letter once the kind's attempts are used up.
pub fn after_failure(spec: &KindSpec, attempt: u32, error: String) -> Verdict {
    if attempt >= spec.max_attempts {
        return Verdict::DeadLetter(Dead {
            reason: DeadReason::MaxAttempts,
            error: Some(error),
            attempts: attempt,
            record: true,
        });
    }
    let delay_ms =
        spec.retry_backoff_ms.saturating_mul(1 << attempt.saturating_sub(1).min(20)).min(MAX_RETRY_DELAY_MS);
    Verdict::Retry { attempt, delay_ms, error }
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
    pub fn reason(self) -> DeadReason {
        match self {
            Self::Parked => DeadReason::ParkedLimit,
            Self::Delayed => DeadReason::DelayedLimit,
            Self::Waiting => DeadReason::WaitingLimit,
        }
    }

    /// What the client holds too many of, in words.
    pub fn holding(self) -> &'static str {
        match self {
            Self::Parked => "jobs waiting for earlier sequence numbers",
            Self::Delayed => "delayed jobs (or jobs waiting for their parents)",
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

    /// It would be held, but its client already holds the most such jobs allowed: dead-lettered
    /// and recorded, not using up a sequence number, so that a replay can run it.
    fn verdict(self, client: &str, caps: &ClientCaps) -> Verdict {
        let error = format!("{client} already has {} {}", self.of(caps), self.holding());
        Verdict::DeadLetter(Dead { reason: self.reason(), error: Some(error), attempts: 0, record: true })
    }
}

/// What [`prepare`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Decided(Verdict),
    /// Run the handler (after counting the attempt with [`begin`]). `suspect`: the previous
    /// attempt was interrupted by the death of the worker process, maybe caused by this very
    /// job, so it runs alone (see `delivery`).
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
    /// For an external kind: the lease its attempt would hold (see [`TurnLease`]).
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

/// An attempt counted by [`begin`]: its number, and the checkpoint an earlier attempt saved.
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    pub attempt: u32,
    pub checkpoint: Option<serde_json::Value>,
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

/// The turn a job of a kind with a running limit waits for, and how many hold it at once: the
/// kind's, or per key the kind's and the client's value of that payload field.
fn turn(spec: &KindSpec, env: &JobEnvelope) -> Option<(String, u32)> {
    match spec.running_limit()? {
        RunningLimit::PerKey { field, max } => {
            Some((format!("{}\u{1f}{}", spec.name, key_value(env, &field)), max))
        }
        RunningLimit::Kind(max) => Some((spec.name.clone(), max)),
    }
}

/// The client's own value of payload field `field` (a limit's key).
fn key_value(env: &JobEnvelope, field: &str) -> String {
    let value = env.payload.get(field).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
    gatehouse_protocol::submit::owned_key(&env.client, &value.unwrap_or_default())
}

fn status_of(tx: &Tx<'_>, job: StoredJob) -> Result<JobStatus, StorageError> {
    let expected = match (job.state, &job.sequence) {
        (JobState::WaitingForSequence, Some((key, _))) => Some(tx.next_expected(key)?),
        _ => None,
    };
    let held = matches!(job.state, JobState::Scheduled | JobState::Throttled);
    let due = if held { tx.scheduled_due(&job.id)? } else { None };
    let mut status = status_from(job);
    status.expected = expected;
    if held {
        match due.filter(|at| *at > now_ms().unsigned_abs()) {
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

/// The answer that the job is already known: its stored status.
fn answered(tx: &Tx<'_>, stored: StoredJob, target: &ReplyTarget) -> Result<Verdict, StorageError> {
    Ok(Verdict::Answered(vec![answer(status_of(tx, stored)?, target)]))
}

/// Records `env`'s outcome; a decided job's attempts, progress, checkpoint, turn and
/// cancellation go with it ([`Tx::on_decided`]) unless it is `fresh`.
/// `fresh`: nothing was stored of the job before this decision (no record, attempt,
/// cancellation, turn), so there is nothing to clean up.
fn record(
    tx: &Tx<'_>,
    env: &JobEnvelope,
    outcome: Outcome,
    sequence: Option<(String, u64)>,
    fresh: bool,
) -> Result<JobStatus, StorageError> {
    let job = match outcome {
        Outcome::Success(result) => stored(env, JobState::Succeeded, Some(result), None, sequence),
        Outcome::Permanent(e) | Outcome::Retryable(e) => {
            stored(env, JobState::Failed, None, Some(e), sequence)
        }
        Outcome::Cancelled => stored(env, JobState::Cancelled, None, None, sequence),
    };
    tx.record_job(&job)?;
    if !fresh {
        tx.on_decided(&env.id)?;
    }
    Ok(status_from(job))
}

/// A job held in storage (not decided): recorded in `state`.
fn hold(
    tx: &Tx<'_>,
    env: &JobEnvelope,
    state: JobState,
    seq: Option<(String, u64)>,
) -> Result<(), StorageError> {
    tx.record_job(&stored(env, state, None, None, seq))
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
        submitted_at_ms: i64::try_from(env.submitted_at_ms).ok(),
    }
}
