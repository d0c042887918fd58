//! Batches: many jobs accepted whole, in one message and one storage transaction, or refused
//! whole (`POST /v1/batches`), and followed as one (`GET /v1/batches/{id}`).
//!
//! The gatekeeper checks, seals and vouches for each job exactly as for `POST /v1/jobs`, then
//! carries every job's message in one vouched [`BatchMessage`] to the queue of the first job.
//! The worker records the batch and holds each job's message in storage in one transaction
//! (so all or none), acks, and sends each job to its own queue, where it runs like any job.
//! A batch's `on_complete` job is kept with it and runs once every job is decided, given the
//! batch's [`BatchSummary`].
//!
//! A workflow (`POST /v1/workflows`) travels and is kept the same way: a batch whose jobs are
//! named steps, each waiting (`after`) for the steps it names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::JobId;

/// Most jobs of one batch, unless the client's policy says fewer (`max_batch_jobs`).
pub const MAX_BATCH_JOBS: usize = 1_000;

/// What the gatekeeper sends for a batch: each job's vouched message as it would publish it
/// alone, carried in one vouched message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchMessage {
    /// The batch's id (minted like a job id: it carries its owner).
    pub batch: JobId,
    pub client: String,
    /// The client's share, for the worker's turns between clients (see `Turn`).
    #[serde(default = "one")]
    pub share: u16,
    pub submitted_at_ms: u64,
    pub jobs: Vec<BatchedJob>,
    /// A workflow: its jobs are named steps.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub workflow: bool,
    /// The job that runs once every job of the batch is decided (its envelope `completes`
    /// the batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_complete: Option<BatchedJob>,
}

fn one() -> u16 {
    1
}

/// One job of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchedJob {
    pub id: JobId,
    /// The job's own vouched message (a `SealedJob` in its `Vouched` wrapping), UTF-8 JSON.
    pub message: String,
    /// A workflow step's name, and the names of the steps it waits for (its envelope's
    /// `after` holds their ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
}

/// What `GET /v1/batches/{id}` answers: how many of the batch's jobs are in each state, and
/// their ids in the order they were submitted. (A batch the worker has not recorded yet is
/// answered `{"id", "status": "queued"}`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSummary {
    pub id: JobId,
    /// `complete` once every job is decided (succeeded, failed, dead-lettered or cancelled),
    /// `running` before.
    pub status: String,
    pub total: usize,
    /// Jobs by state (`scheduled`, `queued`, `succeeded`, ...).
    pub counts: BTreeMap<String, usize>,
    pub jobs: Vec<JobId>,
    /// A workflow's steps, in the order submitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepState>,
    /// Only between worker and gatekeeper, for a workflow's event stream: each step's
    /// transitions after those asked from, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<StepEvent>>,
}

/// A workflow step as its client reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    pub id: JobId,
    pub state: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
}

/// One state transition of a workflow's step (its `seq` numbers the step's own transitions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEvent {
    /// The step's place in the workflow (0-based).
    pub position: usize,
    #[serde(flatten)]
    pub event: crate::JobEvent,
}

/// Most steps of one workflow, unless the client's policy says fewer (`max_workflow_steps`).
pub const MAX_WORKFLOW_STEPS: usize = 100;

/// Whether `name` may name a workflow step: 1 to 64 ASCII letters, digits, `_` or `-`.
pub fn is_step_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The steps in an order where each comes after those it waits for (indexes into `after`,
/// each step's parents); `Err` with a step on a cycle.
///
/// # Errors
/// The index of a step that waits, through its parents, for itself.
pub fn in_dependency_order(after: &[Vec<usize>]) -> Result<Vec<usize>, usize> {
    // Kahn's algorithm: a step is ready once every parent is placed.
    let mut waiting: Vec<usize> = after.iter().map(Vec::len).collect();
    let mut children = vec![Vec::new(); after.len()];
    for (child, parents) in after.iter().enumerate() {
        for &parent in parents {
            children[parent].push(child);
        }
    }
    let mut ready: Vec<usize> = (0..after.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(after.len());
    while let Some(step) = ready.pop() {
        order.push(step);
        for &child in &children[step] {
            waiting[child] -= 1;
            if waiting[child] == 0 {
                ready.push(child);
            }
        }
    }
    match (0..after.len()).find(|&i| waiting[i] > 0) {
        Some(on_cycle) => Err(on_cycle),
        None => Ok(order),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_order_places_parents_first_and_finds_cycles() {
        // extract -> (a, b, c) -> merge
        let after = vec![vec![], vec![0], vec![0], vec![0], vec![1, 2, 3]];
        let order = in_dependency_order(&after).unwrap();
        let place = |i: usize| order.iter().position(|&s| s == i).unwrap();
        for (child, parents) in after.iter().enumerate() {
            assert!(parents.iter().all(|&p| place(p) < place(child)), "{order:?}");
        }
        assert!(in_dependency_order(&[vec![1], vec![0]]).is_err());
        assert_eq!(in_dependency_order(&[vec![], vec![2], vec![1]]).unwrap_err(), 1);
        assert!(in_dependency_order(&[vec![0]]).is_err());
    }

    #[test]
    fn step_names() {
        assert!(is_step_name("score-2_b"));
        assert!(!is_step_name(""));
        assert!(!is_step_name("a b"));
        assert!(!is_step_name(&"x".repeat(65)));
    }
}
