//! Progress: an external handler reports how far it got ([`super::JobContext::progress`];
//! an executable with `GATEHOUSE-PROGRESS <percent> <message>` lines on stderr). Reports go
//! through a bounded channel to one task that keeps the latest per job in storage, sealed and
//! bound to the job and its client, several in one transaction when they come fast; a status
//! query of the running job shows it, and the record goes when the job is decided. Reporting
//! never waits: when the channel is full, a report is dropped (a later one supersedes it).

use std::collections::HashMap;

use gatehouse_protocol::{JobId, Progress};
use gatehouse_storage::Store;
use tokio::sync::mpsc;

/// One report: job, its client, what it said.
pub type Report = (JobId, String, Progress);

/// Where handlers send their reports.
pub type Sender = mpsc::Sender<Report>;

/// Reports waiting to be kept, at most.
const CAPACITY: usize = 1024;

/// The channel of a worker's reports.
pub fn channel() -> (Sender, mpsc::Receiver<Report>) {
    mpsc::channel(CAPACITY)
}

/// Keeps reports until the channel closes.
pub async fn keep(store: Store, mut rx: mpsc::Receiver<Report>) {
    while let Some(first) = rx.recv().await {
        let mut latest: HashMap<JobId, (String, Progress)> = HashMap::new();
        latest.insert(first.0, (first.1, first.2));
        while let Ok((id, client, p)) = rx.try_recv() {
            latest.insert(id, (client, p));
        }
        let kept = store
            .transact(move |tx| {
                latest.iter().try_for_each(|(id, (client, p))| {
                    tx.set_progress(id, client, &serde_json::to_value(p).unwrap_or_default())
                })
            })
            .await;
        if let Err(e) = kept {
            tracing::warn!(error = %e, "could not keep job progress");
        }
    }
}
