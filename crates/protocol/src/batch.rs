//! Batches: many jobs accepted whole, in one message and one storage transaction, or refused
//! whole (`POST /v1/batches`), and followed as one (`GET /v1/batches/{id}`).
//!
//! The gatekeeper checks, seals and vouches for each job exactly as for `POST /v1/jobs`, then
//! carries every job's message in one vouched [`BatchMessage`] to the queue of the first job.
//! The worker records the batch and holds each job's message in storage in one transaction
//! (so all or none), acks, and sends each job to its own queue, where it runs like any job.
//! A batch's `on_complete` job is kept with it and runs once every job is decided, given the
//! batch's [`BatchSummary`].

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
}
