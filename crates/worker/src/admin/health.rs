//! Whether storage takes writes. When it refuses them — the disk is full, the database is
//! read-only, the server is gone ([`StorageError::refusal`]) — every delivery would fail the
//! same way, so the worker stops taking jobs rather than fail each one: the first delivery to
//! meet the refusal reports it here, which says so once at WARN, sets the
//! `storage_refusing_writes` gauge and turns `/readyz` to 503. The session cancels its job
//! consumers (their deliveries go back to the queues, in order); status queries go on, read
//! beside the writer. [`probe`] then writes with backoff until storage takes a write, says so
//! once at INFO, and the session consumes again.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_storage::{StorageError, Store};
use tokio::sync::watch;

use super::metrics::WorkerMetrics;

/// First and longest wait between two probes.
const FIRST_PROBE: Duration = Duration::from_millis(250);
const MAX_PROBE: Duration = Duration::from_secs(10);

/// A refusal this soon after storage came back belongs to the same outage: it is not
/// announced again at WARN.
const SAME_OUTAGE: Duration = Duration::from_secs(120);

/// Whether storage refuses writes, and why.
pub struct StorageHealth {
    refusing: watch::Sender<Option<&'static str>>,
    metrics: Arc<WorkerMetrics>,
    /// When storage last took writes again.
    recovered_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl StorageHealth {
    pub fn new(metrics: Arc<WorkerMetrics>) -> Self {
        Self { refusing: watch::Sender::new(None), metrics, recovered_at: Default::default() }
    }

    /// Reports a storage error; answers whether it says that storage refuses writes (then
    /// this has said so, once per outage, and the caller need not).
    pub fn saw(&self, e: &StorageError) -> bool {
        let Some(reason) = e.refusal() else { return false };
        self.refusing.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            *state = Some(reason);
            let recovered = *self.recovered_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if recovered.is_some_and(|at| at.elapsed() < SAME_OUTAGE) {
                tracing::info!(reason, "storage refused a write again soon after it came back: taking no jobs");
            } else {
                tracing::warn!(reason, error = %e, "storage refuses writes: taking no jobs until it takes them again");
            }
            self.metrics.storage_refusing(true);
            true
        });
        true
    }

    /// The same for an error that may hold a storage error.
    pub fn saw_any(&self, e: &anyhow::Error) -> bool {
        e.chain().filter_map(|c| c.downcast_ref::<StorageError>()).any(|se| self.saw(se))
    }

    /// Storage took a write again.
    fn recovered(&self) {
        self.refusing.send_if_modified(|state| {
            let Some(reason) = state.take() else { return false };
            tracing::info!(was = reason, "storage takes writes again: taking jobs");
            *self.recovered_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(std::time::Instant::now());
            self.metrics.storage_refusing(false);
            true
        });
    }

    /// Why storage refuses writes now, if it does.
    pub fn refusing(&self) -> Option<&'static str> {
        *self.refusing.borrow()
    }

    /// Told of each change.
    pub fn watch(&self) -> watch::Receiver<Option<&'static str>> {
        self.refusing.subscribe()
    }
}

/// While storage refuses writes, tries one ([`Store::probe_writes`]) with backoff, until one
/// is taken; for the worker's lifetime.
pub async fn probe(health: Arc<StorageHealth>, store: Store) {
    let mut changes = health.watch();
    loop {
        if changes.wait_for(Option::is_some).await.is_err() {
            return;
        }
        let mut wait = FIRST_PROBE;
        loop {
            tokio::time::sleep(wait).await;
            match store.probe_writes().await {
                Ok(()) => break,
                Err(e) => tracing::debug!(error = %e, "storage still refuses writes"),
            }
            wait = (wait * 2).min(MAX_PROBE);
        }
        health.recovered();
    }
}
