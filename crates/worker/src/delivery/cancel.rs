//! Cancellation by the client (`DELETE /v1/jobs/{id}`, a control request). The decision is
//! storage's (`decide::cancel`): a cancelled job never starts — a queued, retrying or
//! delayed one is decided `cancelled` when its message next comes by, a parked one in its
//! sequence turn, so that a sequenced job uses up its number and its key moves on. A job whose
//! external handler runs in this worker is told through its context ([`Running`]); it ends
//! `cancelled` unless it got to the end first. An executable gets SIGTERM, then SIGKILL after
//! `CANCEL_GRACE`; a Rust handler that does not stop within it is dropped.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use gatehouse_protocol::JobId;
use tokio::sync::watch;

/// The external handlers running in this worker, by job: how to tell each it was cancelled.
#[derive(Default)]
pub struct Running {
    jobs: Mutex<HashMap<JobId, watch::Sender<bool>>>,
}

/// A job's place in [`Running`] while its handler runs; removed when dropped.
pub struct Registration<'a> {
    running: &'a Running,
    id: JobId,
    /// What the handler's context watches.
    pub cancelled: watch::Receiver<bool>,
}

impl Running {
    /// Registers `id` as running here.
    pub fn register(&self, id: &JobId) -> Registration<'_> {
        let (tx, rx) = watch::channel(false);
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), tx);
        Registration { running: self, id: id.clone(), cancelled: rx }
    }

    /// Tells the handler of `id` (if it runs here) that its job was cancelled.
    pub fn cancel(&self, id: &JobId) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.get(id).is_some_and(|tx| tx.send(true).is_ok())
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.running.jobs.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
    }
}
