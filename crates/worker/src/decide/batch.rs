//! A batch ([`gatehouse_protocol::batch`]): its jobs recorded and held in one transaction, and
//! what its client reads of it.

use gatehouse_protocol::batch::{BatchMessage, BatchSummary};
use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::{JobEnvelope, JobId, JobState, SealedJob, Vouched};
use gatehouse_storage::{Member, StorageError, Tx};

use super::stored;

/// The metadata of each job of `batch` (nothing opened), checked to belong to it: a job
/// message that does not read, names another id or another client makes the whole batch
/// unreadable (`None`).
pub fn jobs_of(batch: &BatchMessage) -> Option<Vec<JobEnvelope>> {
    batch
        .jobs
        .iter()
        .map(|job| {
            let vouched = Vouched::parse(job.message.as_bytes()).ok()?;
            let env = serde_json::from_slice::<SealedJob>(vouched.message()).ok()?.metadata();
            (env.id == job.id && env.client == batch.client).then_some(env)
        })
        .collect()
}

/// Records `batch` and holds each of its jobs (`jobs`, from [`jobs_of`]) `scheduled`, its
/// message kept until the held-messages sweep sends it to its own queue (at once, or at its
/// `not_before`), where it runs like any job — all in this one transaction. Answers how many
/// jobs it held: none for a batch recorded before (a redelivery), and a job storage knows
/// already (an idempotency key used before) is listed in the batch but not held again.
///
/// # Errors
/// A storage failure: nothing of the batch is kept.
pub fn hold_batch(
    tx: &Tx<'_>,
    batch: &BatchMessage,
    jobs: &[JobEnvelope],
    on_complete: Option<&JobEnvelope>,
) -> Result<usize, StorageError> {
    let members: Vec<Member> = batch
        .jobs
        .iter()
        .map(|job| Member { id: job.id.clone(), step: job.step.clone(), after: job.after.clone() })
        .collect();
    let kept = on_complete.map(|env| (env.id.clone(), serde_json::to_value(env).unwrap_or_default()));
    let on_complete = kept.as_ref().map(|(id, env)| (id, env));
    if !tx.record_batch(&batch.batch, &batch.client, batch.workflow, &members, on_complete)? {
        return Ok(0);
    }
    let now = now_ms().unsigned_abs();
    let mut held = 0;
    for (env, job) in jobs.iter().zip(&batch.jobs) {
        // Recorded only if new: a job of the same idempotency key submitted alone at this very
        // moment is left as its own transaction recorded it.
        if !tx.record_new_job(&stored(env, JobState::Scheduled, None, None, None))? {
            continue;
        }
        tx.schedule(&env.id, env.not_before_ms.unwrap_or(now), job.message.as_bytes())?;
        held += 1;
    }
    Ok(held)
}

/// Batch (or workflow) `id` as its owner `client` reads it, with `events_after` its steps'
/// transitions after those; `None` for anyone else's (or an unknown one).
///
/// # Errors
/// A storage failure.
pub fn batch_status(
    tx: &Tx<'_>,
    id: &JobId,
    client: &str,
    events_after: Option<&[u64]>,
) -> Result<Option<BatchSummary>, StorageError> {
    tx.batch_of(id, client, events_after)
}

/// The `on_complete` jobs of batches whose jobs are all decided (at most `limit`): each made
/// again as a job of the worker's own (vouched with its key, `make`, so that its age counts
/// from now, however long the batch took), recorded `scheduled` and held for the sweep to send
/// to its queue — once: the batch is marked sent in the same transaction. Answers how many.
///
/// # Errors
/// A storage failure.
pub fn complete_batches(
    tx: &Tx<'_>,
    limit: u32,
    make: &dyn Fn(&JobEnvelope) -> Option<Vec<u8>>,
) -> Result<usize, StorageError> {
    let mut sent = 0;
    for (summary, kept) in tx.complete_batches(limit)? {
        let Ok(mut env) = serde_json::from_value::<JobEnvelope>(kept) else {
            tracing::error!(batch = %summary.id, "a batch's on_complete job does not read; it does not run");
            continue;
        };
        env.submitted_at_ms = now_ms().unsigned_abs();
        let Some(message) = make(&env) else { continue };
        if !tx.record_new_job(&stored(&env, JobState::Scheduled, None, None, None))? {
            continue;
        }
        let due = env.not_before_ms.map_or(env.submitted_at_ms, |at| at.max(env.submitted_at_ms));
        tx.schedule(&env.id, due, &message)?;
        tracing::info!(batch = %summary.id, job_id = %env.id, "batch complete: its on_complete job goes to its queue");
        sent += 1;
    }
    Ok(sent)
}
