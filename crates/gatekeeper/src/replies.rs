//! Requests waiting for the worker's answer, matched by `correlation_id`.
//!
//! A reply is handed over only if it opens under the reply key of one of this gatekeeper's
//! recent sessions *for exactly what the request waits for*: its correlation id, job id and
//! client are bound into the reply's associated data. A reply to someone else's job, or meant
//! for another request, is dropped and counted as forged.
//!
//! The map is bounded (a full map answers 503 rather than growing), and each entry is removed
//! when its waiter is dropped, whether it got an answer or timed out. Replies nobody waits for
//! any more are dropped and counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use gatehouse_broker::lapin::Channel;
use gatehouse_broker::lapin::options::BasicConsumeOptions;
use gatehouse_broker::lapin::types::FieldTable;
use gatehouse_protocol::{JobId, JobStatus, SealedReply};
use prometheus_client::metrics::counter::Counter;
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
    pending: Mutex<HashMap<String, Pending>>,
    late: Counter,
    forged: Counter,
    rng: SystemRandom,
}

/// What one waiting request expects, and where its answers go.
#[derive(Clone)]
struct Pending {
    job: JobId,
    client: String,
    tx: mpsc::Sender<JobStatus>,
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
    /// `instance` names this process; `queue` is its reply queue; `(late, forged)` count the
    /// replies nobody waited for any more and those that did not open (the metrics' counters).
    pub fn new(
        instance: String,
        queue: String,
        max_pending: usize,
        (late, forged): (Counter, Counter),
    ) -> Arc<Self> {
        Arc::new(Self {
            instance,
            queue,
            max_pending,
            pending: Mutex::new(HashMap::new()),
            late,
            forged,
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

    /// Registers a fresh correlation id for a request that waits for job `job` of `client`.
    ///
    /// # Errors
    /// [`Full`] when `max_pending` requests already wait.
    pub fn register(self: &Arc<Self>, job: &JobId, client: &str) -> Result<Waiter, Full> {
        let mut raw = [0u8; 16];
        self.rng.fill(&mut raw).map_err(|_| Full)?;
        let correlation_id = gatehouse_protocol::JobId::from_bytes(raw).to_string();
        let (tx, rx) = mpsc::channel(ANSWERS_PER_WAITER);
        let mut pending = self.lock();
        if pending.len() >= self.max_pending {
            return Err(Full);
        }
        pending.insert(correlation_id.clone(), Pending { job: job.clone(), client: client.to_owned(), tx });
        Ok(Waiter { replies: self.clone(), correlation_id, rx })
    }

    /// Opens `reply` for whoever waits for `correlation_id` and hands it over; one that does
    /// not open for exactly that request (its job, its client, a recent session of ours) is
    /// dropped and counted as forged.
    fn complete(&self, correlation_id: &str, reply: &SealedReply, keys: &GatekeeperKeys) {
        let Some(p) = self.lock().get(correlation_id).cloned() else {
            self.late.inc();
            return;
        };
        let opened = keys
            .recent(&reply.session)
            .ok_or(gatehouse_protocol::crypto::CryptoError::Open)
            .and_then(|session| reply.open(&session, correlation_id, &p.job, &p.client));
        match opened {
            Ok(status) => {
                if p.tx.try_send(status).is_err() {
                    self.late.inc();
                }
            }
            Err(_) => {
                self.forged.inc();
                tracing::warn!("a reply that does not open for its request was dropped");
            }
        }
    }

    /// Replies that arrived after their request had stopped waiting.
    pub fn late_count(&self) -> u64 {
        self.late.get()
    }

    /// Replies dropped because they did not open for the request they named (forged, altered,
    /// someone else's answer, or sealed in a session past the reply window).
    pub fn forged_count(&self) -> u64 {
        self.forged.get()
    }

    /// Requests waiting now.
    pub fn pending_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Consumes the reply queue (auto-ack: replies are a courtesy, the record is in the
    /// worker's storage) until the channel closes.
    ///
    /// # Errors
    /// When consuming cannot start.
    ///
    /// A reply counts only if it opens for the request its correlation id names (see the
    /// module docs); anything else is dropped and counted as forged.
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
                match serde_json::from_slice::<SealedReply>(&d.data) {
                    Ok(reply) => self.complete(&cid, &reply, &keys),
                    Err(_) => {
                        self.forged.inc();
                        tracing::warn!("an undecodable reply was dropped");
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
    use gatehouse_protocol::JobId;

    use super::*;

    #[tokio::test]
    async fn bounded_and_cleaned_on_drop() {
        let r = Replies::new("i".into(), "q".into(), 2, Default::default());
        let job = JobId::from_bytes([0; 16]);
        let a = r.register(&job, "c").unwrap();
        let _b = r.register(&job, "c").unwrap();
        assert!(r.register(&job, "c").is_err());
        drop(a);
        assert_eq!(r.pending_count(), 1);
        assert!(r.register(&job, "c").is_ok());
    }
}
