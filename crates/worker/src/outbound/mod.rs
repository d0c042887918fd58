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
        })
    }
}
