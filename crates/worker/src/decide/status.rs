//! What a client asks about its job: its status, and its cancellation.

use gatehouse_protocol::{JobId, JobState, JobStatus};
use gatehouse_storage::{StorageError, Tx};

use super::status_of;

/// The status of `id` for `client`: not found when it does not exist *or* is someone else's.
///
/// # Errors
/// Only storage failures.
pub fn status_for(tx: &Tx<'_>, id: &JobId, client: &str) -> Result<JobStatus, StorageError> {
    let probe = tx.probe(id)?;
    if let Some(job) = probe.job {
        return if job.client != client {
            Ok(JobStatus::new(id.clone(), JobState::NotFound))
        } else if !job.state.is_final() && probe.cancelled {
            // It will never run; its record says so once its message comes by.
            Ok(JobStatus::new(id.clone(), JobState::Cancelled))
        } else {
            status_of(tx, job)
        };
    }
    let running = probe.attempts.as_ref().filter(|a| a.client == client).is_some_and(|a| a.running);
    if !running && probe.cancelled {
        return Ok(JobStatus::new(id.clone(), JobState::Cancelled));
    }
    Ok(match probe.attempts {
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
