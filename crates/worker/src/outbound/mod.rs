//! What the worker sends, on one broker connection: replies to waiting callers
//! ([`Outbound::reply`]), retries ([`Outbound::retry`]), dead letters
//! ([`Outbound::dead_letter`], the one way a message is dead-lettered, from a delivery or a
//! sweeper), and messages held in storage sent back to their queue ([`Outbound::send_back`]).
//! Retries, dead letters and held messages are published with confirms: the delivery they
//! replace is acked only once they are durable. Replies are not (see [`reply`]).

mod dead;
mod reply;
mod retry;
mod send_back;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use gatehouse_broker::lapin::{Channel, Connection};
use gatehouse_broker::{Publisher, Topology};
use gatehouse_protocol::Catalog;
use gatehouse_storage::Store;

use crate::admin::metrics::WorkerMetrics;
use crate::security::WorkerKeys;
pub use dead::{Letter, NotSent, dead_properties};
pub use retry::without_replay;

/// The sending side of one broker connection, and what deciding where a message goes needs.
pub struct Outbound {
    pub store: Store,
    pub catalog: Arc<Catalog>,
    pub keys: Arc<WorkerKeys>,
    pub metrics: Arc<WorkerMetrics>,
    pub topology: Topology,
    /// Confirm channel for retries, dead letters and held messages.
    publisher: Publisher,
    /// Channel for replies (no confirms).
    replies: Channel,
    /// Retry queues declared on this connection.
    retry_queues: Mutex<HashSet<String>>,
    /// Wakes this connection's held-messages sweep before its next pass is due.
    pub held: HeldWake,
}

/// What makes the held-messages sweep run at once rather than at its next tick: a batch or
/// workflow just held (its jobs are due now), or a job decided while jobs wait for parents or
/// batches for their `on_complete` (they may be due). Wakes coalesce: one pass serves all
/// that came before it.
#[derive(Default)]
pub struct HeldWake {
    notify: tokio::sync::Notify,
    /// When something that waits for jobs to be decided was last held here (unix ms; 0: storage
    /// holds nothing that does). Only then does a decided job wake the sweep.
    waiting_since: std::sync::atomic::AtomicI64,
}

/// How long after something that waits was held the sweep keeps being woken by decided jobs,
/// even if storage showed nothing waiting: a workflow's steps are held waiting a moment after
/// the workflow is.
const WAITING_GRACE_MS: i64 = 2_000;

impl HeldWake {
    /// Messages were just held, due now.
    pub fn now(&self) {
        self.notify.notify_one();
    }

    /// A job was decided (its children, or its batch's on_complete job, may be due now).
    pub fn decided(&self) {
        if self.may_wait() {
            self.notify.notify_one();
        }
    }

    /// Something that waits for jobs to be decided was held (`true`), or storage holds nothing
    /// that does (`false`: heeded only past [`WAITING_GRACE_MS`] after the last `true`).
    pub fn waiting(&self, waiting: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = gatehouse_protocol::clock::now_ms();
        if waiting {
            self.waiting_since.store(now.max(1), Relaxed);
        } else if now - self.waiting_since.load(Relaxed) > WAITING_GRACE_MS {
            self.waiting_since.store(0, Relaxed);
        }
    }

    /// Whether anything may wait for jobs to be decided.
    pub fn may_wait(&self) -> bool {
        self.waiting_since.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    /// Until woken.
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

impl Outbound {
    /// Opens the channels it sends on; the rest it shares with the worker.
    ///
    /// # Errors
    /// When the broker refuses a channel.
    pub async fn open(
        connection: &Connection,
        store: Store,
        catalog: Arc<Catalog>,
        keys: Arc<WorkerKeys>,
        metrics: Arc<WorkerMetrics>,
        topology: Topology,
    ) -> Result<Self, gatehouse_broker::lapin::Error> {
        Ok(Self {
            store,
            catalog,
            keys,
            metrics,
            topology,
            publisher: Publisher::open(connection).await?,
            replies: connection.create_channel().await?,
            retry_queues: Mutex::default(),
            held: HeldWake::default(),
        })
    }
}
