//! Requests waiting for the worker's answer, matched by `correlation_id`.
//!
//! The map is bounded (a full map answers 503 rather than growing), and each entry is removed
//! when its waiter is dropped, whether it got an answer or timed out. Replies nobody waits for
//! any more are dropped and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use gatehouse_broker::lapin::Channel;
use gatehouse_broker::lapin::options::BasicConsumeOptions;
use gatehouse_broker::lapin::types::FieldTable;
use gatehouse_protocol::{JobStatus, SealedReply};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;

use crate::keys::GatekeeperKeys;

/// Answers a waiter can hold before the worker's further replies are dropped; a job sends at
/// most two (e.g. `waiting_for_sequence`, then its outcome).
const ANSWERS_PER_WAITER: usize = 4;

/// The pending requests of this gatekeeper instance.
pub struct Replies {
    instance: String,
    queue: String,
    max_pending: usize,
    pending: Mutex<HashMap<String, mpsc::Sender<JobStatus>>>,
    late: AtomicU64,
    forged: AtomicU64,
    rng: SystemRandom,
}

/// The map is full.
#[derive(Debug, thiserror::Error)]
#[error("too many requests are waiting for the worker")]
pub struct Full;

/// One request's claim on the answers for its correlation id. Dropping it forgets the id.
pub struct Waiter {
    replies: Arc<Replies>,
    correlation_id: String,
    rx: mpsc::Receiver<JobStatus>,
}

impl Replies {
    /// `instance` names this process; `queue` is its reply queue.
    pub fn new(instance: String, queue: String, max_pending: usize) -> Arc<Self> {
        Arc::new(Self {
            instance,
            queue,
            max_pending,
            pending: Mutex::new(HashMap::new()),
            late: AtomicU64::new(0),
            forged: AtomicU64::new(0),
            rng: SystemRandom::new(),
        })
    }

    /// This gatekeeper process's id (part of the reply queue name).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The reply queue name, for `reply_to`.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Registers a fresh correlation id.
    ///
    /// # Errors
    /// [`Full`] when `max_pending` requests already wait.
    pub fn register(self: &Arc<Self>) -> Result<Waiter, Full> {
        let mut raw = [0u8; 16];
        self.rng.fill(&mut raw).map_err(|_| Full)?;
        let correlation_id = gatehouse_protocol::JobId::from_bytes(raw).to_string();
        let (tx, rx) = mpsc::channel(ANSWERS_PER_WAITER);
        let mut pending = self.lock();
        if pending.len() >= self.max_pending {
            return Err(Full);
        }
        pending.insert(correlation_id.clone(), tx);
        Ok(Waiter { replies: self.clone(), correlation_id, rx })
    }

    /// Hands an answer to whoever waits for `correlation_id`.
    pub fn complete(&self, correlation_id: &str, status: JobStatus) {
        let tx = self.lock().get(correlation_id).cloned();
        if tx.is_none_or(|tx| tx.try_send(status).is_err()) {
            self.late.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Replies that arrived after their request had stopped waiting.
    pub fn late_count(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }

    /// Replies dropped because they did not open under the pair key (forged or altered).
    pub fn forged_count(&self) -> u64 {
        self.forged.load(Ordering::Relaxed)
    }

    /// Requests waiting now.
    pub fn pending_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<JobStatus>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Consumes the reply queue (auto-ack: replies are a courtesy, the record is in the
    /// worker's storage) until the channel closes.
    ///
    /// # Errors
    /// When consuming cannot start.
    ///
    /// A reply counts only if it opens under the worker–gatekeeper pair key for its
    /// correlation id (which only the worker can seal); anything else is dropped and counted
    /// as forged.
    pub async fn consume(
        self: Arc<Self>,
        channel: Channel,
        keys: Arc<GatekeeperKeys>,
    ) -> Result<tokio::task::JoinHandle<()>, gatehouse_broker::lapin::Error> {
        let opts = BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "gatekeeper.replies".into(),
                opts,
                FieldTable::default(),
            )
            .await?;
        Ok(tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let Some(cid) = d.properties.correlation_id().as_ref().map(ToString::to_string) else {
                    continue;
                };
                let opened = serde_json::from_slice::<SealedReply>(&d.data)
                    .ok()
                    .and_then(|r| r.open(&keys.replies, &cid).ok());
                match opened {
                    Some(status) => self.complete(&cid, status),
                    None => {
                        self.forged.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("forged or unopenable reply dropped");
                    }
                }
            }
            tracing::debug!("reply consumer stopped");
        }))
    }
}

impl Waiter {
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// The next answer, or `None` at the deadline.
    pub async fn next_until(&mut self, deadline: tokio::time::Instant) -> Option<JobStatus> {
        tokio::time::timeout_at(deadline, self.rx.recv()).await.ok().flatten()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.replies.lock().remove(&self.correlation_id);
    }
}

#[cfg(test)]
mod tests {
    use gatehouse_protocol::{JobId, JobState};

    use super::*;

    #[tokio::test]
    async fn bounded_and_cleaned_on_drop() {
        let r = Replies::new("i".into(), "q".into(), 2);
        let a = r.register().unwrap();
        let _b = r.register().unwrap();
        assert!(r.register().is_err());
        let cid = a.correlation_id().to_owned();
        drop(a);
        assert_eq!(r.pending_count(), 1);
        r.complete(&cid, JobStatus::new(JobId::from_bytes([0; 16]), JobState::Succeeded));
        assert_eq!(r.late_count(), 1);
        assert!(r.register().is_ok());
    }

    #[tokio::test]
    async fn answers_reach_their_waiter() {
        let r = Replies::new("i".into(), "q".into(), 8);
        let mut w = r.register().unwrap();
        let status = JobStatus::new(JobId::from_bytes([1; 16]), JobState::Succeeded);
        r.complete(w.correlation_id(), status.clone());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        assert_eq!(w.next_until(deadline).await, Some(status));
    }
}
