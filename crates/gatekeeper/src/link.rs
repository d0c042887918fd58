//! The gatekeeper's link to the broker: one connection with a confirm channel for publishing
//! and a consumer on this instance's reply queue. When the connection is lost, requests get
//! `503` at once (no publisher), while a supervisor reconnects with backoff and redeclares the
//! topology and the reply queue.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use gatehouse_broker::lapin::Connection;
use gatehouse_broker::{BrokerSettings, Publisher};
use gatehouse_protocol::catalog::QueueClass;
use tokio::task::JoinHandle;

use crate::replies::Replies;

/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The current broker link, if any.
pub struct BrokerLink {
    settings: BrokerSettings,
    queues: Vec<QueueClass>,
    replies: Arc<Replies>,
    publisher: RwLock<Option<Publisher>>,
    connection: tokio::sync::Mutex<Option<Connection>>,
}

/// The reply consumer of one live connection: it ends when the connection dies.
struct Session {
    reply_consumer: JoinHandle<()>,
}

impl BrokerLink {
    /// Connects once (failing if the broker cannot be reached now) and starts the supervisor
    /// that keeps the link up from then on.
    ///
    /// # Errors
    /// When the first connection or declaration fails.
    pub async fn start(
        settings: BrokerSettings,
        queues: Vec<QueueClass>,
        replies: Arc<Replies>,
    ) -> anyhow::Result<(Arc<Self>, JoinHandle<()>)> {
        let link = Arc::new(Self {
            settings,
            queues,
            replies,
            publisher: RwLock::new(None),
            connection: tokio::sync::Mutex::new(None),
        });
        let first = link.connect().await?;
        let supervisor = tokio::spawn(link.clone().supervise(first));
        Ok((link, supervisor))
    }

    /// The publisher, when connected.
    pub fn publisher(&self) -> Option<Publisher> {
        self.publisher
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .filter(Publisher::is_open)
    }

    fn set(&self, p: Option<Publisher>) {
        *self.publisher.write().unwrap_or_else(std::sync::PoisonError::into_inner) = p;
    }

    async fn connect(&self) -> anyhow::Result<Session> {
        let connection = gatehouse_broker::connect(self.settings.url.expose(), "gatehouse-gatekeeper")
            .await
            .context("connecting to the broker")?;
        let topology = self.settings.topology();
        let setup = connection.create_channel().await?;
        topology.declare(&setup, &self.queues).await.context("declaring topology")?;
        topology.declare_reply_queue(&setup, self.replies.instance()).await?;
        let reply_consumer = self.replies.clone().consume(setup).await?;
        self.set(Some(Publisher::open(&connection).await?));
        *self.connection.lock().await = Some(connection);
        Ok(Session { reply_consumer })
    }

    /// Waits for the session to die, then reconnects, forever (until aborted).
    async fn supervise(self: Arc<Self>, mut session: Session) {
        loop {
            let _ = (&mut session.reply_consumer).await;
            self.set(None);
            if let Some(c) = self.connection.lock().await.take() {
                let _ = c.close(200, "reconnecting".into()).await;
            }
            tracing::warn!("broker connection lost; answering 503 until it is back");
            let mut backoff = Duration::from_millis(250);
            session = loop {
                match self.connect().await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), ?backoff, "broker unavailable; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            };
            tracing::info!("reconnected to the broker");
        }
    }

    /// Closes the current connection (on shutdown).
    pub async fn close(&self) {
        self.set(None);
        if let Some(c) = self.connection.lock().await.take() {
            let _ = c.close(200, "gatekeeper stopping".into()).await;
        }
    }
}
