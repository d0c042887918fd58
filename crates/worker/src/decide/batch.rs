//! A batch ([`gatehouse_protocol::batch`]): its jobs recorded and held in one transaction, and
//! what its client reads of it.

use gatehouse_protocol::batch::{BatchMessage, BatchSummary};
use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::{JobEnvelope, JobId, JobState, SealedJob, Vouched};
use gatehouse_storage::{StorageError, Tx};

use super::hold;

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
pub fn hold_batch(tx: &Tx<'_>, batch: &BatchMessage, jobs: &[JobEnvelope]) -> Result<usize, StorageError> {
    let ids: Vec<JobId> = jobs.iter().map(|env| env.id.clone()).collect();
    if !tx.record_batch(&batch.batch, &batch.client, &ids)? {
        return Ok(0);
    }
    let now = now_ms().unsigned_abs();
    let mut held = 0;
    for (env, job) in jobs.iter().zip(&batch.jobs) {
        if tx.job(&env.id)?.is_some() {
            continue;
        }
        hold(tx, env, JobState::Scheduled, None)?;
        tx.schedule(&env.id, env.not_before_ms.unwrap_or(now), job.message.as_bytes())?;
        held += 1;
    }
    Ok(held)
}

/// Batch `id` as its owner `client` reads it; `None` for anyone else's (or an unknown one).
///
/// # Errors
/// A storage failure.
pub fn batch_status(tx: &Tx<'_>, id: &JobId, client: &str) -> Result<Option<BatchSummary>, StorageError> {
    Ok(tx.batch_of(id, client)?.map(|record| BatchSummary {
        id: id.clone(),
        status: if record.complete { "complete" } else { "running" }.to_owned(),
        total: record.jobs.len(),
        counts: record.counts,
        jobs: record.jobs,
    }))
}
