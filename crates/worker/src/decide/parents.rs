//! A job that waits for others (`after`): held `waiting_for_parents` until every parent is
//! decided, then run — or ended `cancelled` (`parent-failed`) when a parent did not succeed,
//! unless it asked to run all the same (`on_parent_failure = "run"`). Its own children then
//! see it cancelled, and end so in their turn. Waiting jobs count against the client's cap of
//! delayed (held) jobs: past it, a job is dead-lettered, replayable, as a delayed one is.

use gatehouse_protocol::envelope::ParentFailure;
use gatehouse_protocol::{JobState, JobStatus};
use gatehouse_storage::{StorageError, Tx};

use super::{Arrival, Cap, Verdict, answer, hold, stored};

/// Why a job ended without running: a parent did not succeed.
pub const PARENT_FAILED: &str = "parent-failed";

/// `None`: the job has no parents, or they are all decided and it goes on. Otherwise it waits
/// (held, its message kept: the held-messages sweep sends it back once its parents are decided)
/// or ends cancelled. `state`: what storage holds of it now; `cancelled`: its client cancelled
/// it (it goes on, to be decided so, without waiting).
///
/// # Errors
/// Only storage failures.
pub fn after_parents(
    tx: &Tx<'_>,
    arrival: &Arrival,
    state: Option<JobState>,
    cancelled: bool,
) -> Result<Option<Verdict>, StorageError> {
    let env = &arrival.env;
    if env.after.is_empty() {
        return Ok(None);
    }
    let was_waiting = state == Some(JobState::WaitingForParents);
    let parents = tx.parents(&env.after, &env.client)?;
    let pending = parents.iter().any(|p| p.as_ref().is_none_or(|job| !job.state.is_final()));
    if pending && !cancelled {
        if !was_waiting {
            // Held like a delayed job, under the same cap of what one client may hold.
            if tx.delayed_count_of(&env.client)? >= arrival.caps.delayed {
                return Ok(Some(Cap::Delayed.verdict(&env.client, &arrival.caps)));
            }
            hold(tx, env, JobState::WaitingForParents, None)?;
            tx.wait_for_parents(&env.id, &env.after, &arrival.raw)?;
        }
        let status = JobStatus::new(env.id.clone(), JobState::WaitingForParents);
        return Ok(Some(Verdict::Answered(vec![answer(status, &arrival.target)])));
    }
    if was_waiting {
        tx.stop_waiting_for_parents(&env.id)?;
    }
    let failed = parents.iter().flatten().find(|job| job.state != JobState::Succeeded);
    match failed {
        Some(parent) if !cancelled && env.on_parent_failure == ParentFailure::Cancel => {
            let error = format!("{PARENT_FAILED}: parent {} ended {}", parent.id, parent.state.as_str());
            let mut job = stored(env, JobState::Cancelled, None, Some(error), None);
            job.reason = Some(PARENT_FAILED.to_owned());
            tx.record_job(&job)?;
            tx.on_decided(&env.id)?;
            let mut status = JobStatus::new(env.id.clone(), JobState::Cancelled);
            status.reason = job.reason;
            status.error = job.error;
            Ok(Some(Verdict::Answered(vec![answer(status, &arrival.target)])))
        }
        _ => Ok(None),
    }
}
