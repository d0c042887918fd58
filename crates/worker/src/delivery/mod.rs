//! One delivery, from arrival to ack. [`job::handle_job`] checks it, decides it in storage
//! (`decide`), runs an external handler (isolated, bounded, leased: [`run`], [`lease`]) and
//! hands the [`Verdict`](crate::decide::Verdict) to [`settle`], the one owner of ack / nack
//! decisions:
//!
//! | what happened                                   | broker action                            |
//! |-------------------------------------------------|------------------------------------------|
//! | decided and committed (any outcome), or held     | reply, then `ack`                        |
//! | handler failed retryably, attempts left         | publish to a retry queue (confirmed), `ack` |
//! | attempts exhausted; unknown kind; over a client's cap | publish to `gatehouse.dead` with reason headers (confirmed), record, `ack` |
//! | unsigned or badly signed, stale, undecodable, unsealable, misrouted (queue or priority not the vouched ones), a replay without a valid operator grant | the same, without running or recording anything |
//! | storage or broker trouble before a decision     | `nack` + requeue after a pause           |
//! | storage refuses writes (disk full, read-only, gone) | the same, and no more jobs are taken until it takes a write ([`crate::admin::health`]) |
//! | a long job handed off ([`lease`])               | `ack` at hand-off; its message held in storage under a lease |
//!
//! The original delivery is acked only after whatever replaces it (outcome, retry message,
//! dead letter) is durable, so a crash anywhere means a redelivery, which the job id makes
//! harmless.
//!
//! **Crash isolation.** A job that crashes the worker process also interrupts the jobs running
//! beside it, and each interrupted attempt counts. So a job whose previous attempt was
//! interrupted (a *suspect*) runs alone: it waits for the running jobs, and others wait for
//! it. The culprit then crashes alone and reaches its max attempts; a bystander is charged at
//! most the one attempt it was running when the first crash hit.
//!
//! What a delivery sees lives as long as it must: [`Shared`] for the worker's lifetime,
//! [`Outbound`] per broker connection, [`settle::JobChannel`] per channel, bundled per
//! delivery in a [`Ctx`].

pub mod acks;
mod batch;
pub mod cancel;
mod checks;
pub mod control;
pub mod job;
pub mod job_locks;
pub mod lease;
mod run;
pub mod settle;
pub mod turns;

use std::sync::Arc;

use gatehouse_protocol::Catalog;
use gatehouse_storage::Store;
use tokio::sync::{RwLock, watch};

use crate::admin::health::StorageHealth;
use crate::admin::metrics::WorkerMetrics;
use crate::decide::ClientCaps;
use crate::handlers::Kinds;
use crate::handlers::progress;
use crate::outbound::Outbound;
use crate::security::WorkerKeys;
use crate::settings::LeaseSettings;

/// What every delivery of the worker's lifetime shares.
pub struct Shared {
    pub store: Store,
    pub catalog: Arc<Catalog>,
    /// The handlers and schemas of the kinds this worker runs.
    pub kinds: Arc<Kinds>,
    pub keys: Arc<WorkerKeys>,
    pub metrics: Arc<WorkerMetrics>,
    /// Whether storage takes writes (when it refuses them, no jobs are taken).
    pub health: Arc<StorageHealth>,
    /// Whether the `test.*` kinds run.
    pub testing: bool,
    /// Becomes `true` when the worker begins to shut down (handlers see it in their context).
    pub stop: watch::Receiver<bool>,
    /// Jobs run under the read side; suspects (see the module docs) under the write side.
    pub isolation: RwLock<()>,
    /// One delivery of a job at a time.
    pub job_locks: job_locks::JobLocks,
    /// External handlers running here, to tell of a cancellation.
    pub running: cancel::Running,
    /// Where handlers' progress reports go.
    pub progress: progress::Sender,
    /// What one client may hold in storage.
    pub caps: ClientCaps,
    /// When a running job's delivery is acked and its message held in storage instead.
    pub leases: LeaseSettings,
}

/// What one delivery works with: the worker's, its connection's and its channel's parts.
#[derive(Clone)]
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub out: Arc<Outbound>,
    pub channel: Arc<settle::JobChannel>,
}
