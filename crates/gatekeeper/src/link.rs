//! The gatekeeper's link to the broker: one connection with a confirm channel for publishing
//! and a consumer on this instance's reply queue. While the link is down, requests get `503`
//! at once (no publisher), and a supervisor reconnects with backoff and redeclares the reply
//! queue. The rest of the topology belongs to the worker: the gatekeeper's broker user may
//! not create or change it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use gatehouse_broker::backoff::{is_missing_topology, is_unreachable};
use gatehouse_broker::lapin::Connection;
use gatehouse_broker::{Backoff, BrokerSettings, Publisher};
use tokio::task::JoinHandle;

use crate::keys::GatekeeperKeys;
use crate::replies::Replies;

/// Longest pause between reconnection attempts: short, since every request answers 503 until
/// the link is back, and an attempt on a broker that is down costs one refused connection.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the supervisor checks that the publishing channel is still open (the broker
/// closes a channel that publishes to a missing exchange, without closing the connection).
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// The current broker link, if any.
pub struct BrokerLink {
    settings: BrokerSettings,
    replies: Arc<Replies>,
    keys: Arc<GatekeeperKeys>,
    publisher: RwLock<Option<Publisher>>,
    /// The connection and its reply channel (closed first on shutdown, so that the consumer
    /// ends cleanly instead of with a connection error).
    connection: tokio::sync::Mutex<Option<(Connection, gatehouse_broker::lapin::Channel)>>,
}

impl BrokerLink {
    /// Connects (or, if the broker is not there yet, keeps trying in the background) and
    /// starts the supervisor that keeps the link up.
    pub async fn start(
        settings: BrokerSettings,
        replies: Arc<Replies>,
        keys: Arc<GatekeeperKeys>,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let link = Arc::new(Self {
            settings,
            replies,
            keys,
            publisher: RwLock::new(None),
            connection: tokio::sync::Mutex::new(None),
        });
        let mut backoff = Backoff::new(Duration::from_millis(250), MAX_BACKOFF);
        let first = match link.connect().await {
            Ok(consumer) => Some(consumer),
            Err(e) => {
                report(&mut backoff, &e, true);
                None
            }
        };
        let supervisor = tokio::spawn(link.clone().supervise(first, backoff));
        (link, supervisor)
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

    /// Connects, declares and consumes the reply queue, opens the publisher. Answers the reply
    /// consumer task, which ends when the connection dies.
    async fn connect(&self) -> anyhow::Result<JoinHandle<()>> {
        let connection = gatehouse_broker::connect_with(&self.settings, "gatehouse-gatekeeper")
            .await
            .context("connecting to the broker")?;
        let setup = connection.create_channel().await?;
        self.settings
            .topology()
            .declare_reply_queue(&setup, self.replies.instance())
            .await
            .context("declaring the reply queue (has the worker declared the topology?)")?;
        let reply_consumer = self.replies.clone().consume(setup.clone(), self.keys.clone()).await?;
        self.set(Some(Publisher::open(&connection).await?));
        *self.connection.lock().await = Some((connection, setup));
        Ok(reply_consumer)
    }

    /// Keeps the link up until aborted.
    async fn supervise(self: Arc<Self>, mut consumer: Option<JoinHandle<()>>, mut backoff: Backoff) {
        // Until the first connection, a missing broker or topology is the normal start-up race.
        let mut starting = consumer.is_none();
        loop {
            if let Some(mut c) = consumer.take() {
                let mut check = tokio::time::interval(CHECK_EVERY);
                loop {
                    tokio::select! {
                        _ = &mut c => break,
                        _ = check.tick() => if self.publisher().is_none() { c.abort(); break },
                    }
                }
                self.set(None);
                if let Some((conn, _)) = self.connection.lock().await.take() {
                    let _ = conn.close(200, "reconnecting".into()).await;
                }
                tracing::warn!("broker link lost; answering 503 until it is back");
            }
            consumer = loop {
                match self.connect().await {
                    Ok(c) => break Some(c),
                    Err(e) => tokio::time::sleep(report(&mut backoff, &e, starting)).await,
                }
            };
            starting = false;
            backoff.succeeded();
            tracing::info!("connected to the broker");
        }
    }

    /// Closes the current connection (on shutdown).
    pub async fn close(&self) {
        self.set(None);
        if let Some((c, replies)) = self.connection.lock().await.take() {
            let _ = replies.close(200, "gatekeeper stopping".into()).await;
            let _ = c.close(200, "gatekeeper stopping".into()).await;
        }
    }
}

/// Logs a failed connection attempt (once per outage) and answers the pause before the next.
/// While `starting`, a broker that is not up yet or a topology the worker has not declared yet
/// is the expected start-up race: said once at INFO.
fn report(backoff: &mut Backoff, e: &anyhow::Error, starting: bool) -> Duration {
    if is_missing_topology(e) {
        // The expected start-up race, in plain words: what is missing, not the AMQP text.
        let missing = missing_name(&format!("{e:#}")).unwrap_or_else(|| "its queues and exchanges".into());
        return backoff.failed(
            "waiting for the worker to declare the topology; answering 503 until it has",
            &format!("{missing} not declared yet"),
            starting,
        );
    }
    let expected = starting && is_unreachable(e);
    backoff.failed("broker unavailable; answering 503 until it is back", &format!("{e:#}"), expected)
}

/// The quoted name in a broker's `NOT_FOUND - no exchange 'x' in vhost '/'`.
fn missing_name(text: &str) -> Option<String> {
    let rest = &text[text.find("NOT_FOUND - no ")? + "NOT_FOUND - no ".len()..];
    let (what, rest) = rest.split_once(" '")?;
    let (name, _) = rest.split_once('\'')?;
    Some(format!("{what} {name}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_exchange_is_named_in_plain_words() {
        let amqp = "connecting: protocol error: AMQP soft error: NOT_FOUND - no exchange 't1.gatehouse.replies' in vhost '/'";
        assert_eq!(super::missing_name(amqp).as_deref(), Some("exchange t1.gatehouse.replies"));
        assert_eq!(super::missing_name("connection refused"), None);
    }
}
