//! Publishing with publisher confirms: a job counts as accepted only when the broker has
//! confirmed it, and a `mandatory` publish that the broker returns counts as refused.

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};

/// Why the broker did not take a message.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker nacked it, e.g. the queue is full (`reject-publish`).
    #[error("the broker refused the message (queue full or broker overloaded)")]
    Nacked,
    /// No queue is bound for the routing key.
    #[error("the broker could not route the message: {0}")]
    Returned(String),
    /// The channel or connection failed.
    #[error("broker connection: {0}")]
    Broker(#[from] lapin::Error),
}

/// A channel in confirm mode. Cheap to share: publishes on it are pipelined, each awaiting its
/// own confirm.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a channel on `conn` and puts it in confirm mode.
    ///
    /// # Errors
    /// When the channel cannot be opened.
    pub async fn open(conn: &Connection) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { channel })
    }

    /// Publishes persistent and `mandatory`, and waits for the broker's confirm: once this
    /// returns `Ok`, the message is on disk in a queue.
    ///
    /// # Errors
    /// [`PublishError`] when the message is not durably on a queue.
    pub async fn publish_persistent(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish(exchange, routing_key, body, properties.with_delivery_mode(2)).await
    }

    /// Publishes transient and `mandatory` (for queries that are cheap to repeat), and waits
    /// for the broker's confirm that a queue took it.
    ///
    /// # Errors
    /// [`PublishError`] when no queue took the message.
    pub async fn publish_transient(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish(exchange, routing_key, body, properties.with_delivery_mode(1)).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = self
            .channel
            .basic_publish(exchange.into(), routing_key.into(), opts, body, properties)
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(PublishError::Returned(returned.reply_text.to_string()))
            }
            // NotRequested cannot happen on a confirm channel; never count it as accepted.
            Confirmation::Nack(None) | Confirmation::NotRequested => Err(PublishError::Nacked),
        }
    }

    /// Whether the channel is open.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}
