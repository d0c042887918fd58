//! A failed attempt's message, to the retry queue of its route and delay; it comes back to
//! its job queue when the delay has passed (the queue's TTL dead-letters it there).

use gatehouse_broker::PublishError;
use gatehouse_broker::lapin::BasicProperties;
use gatehouse_broker::lapin::types::FieldTable;
use gatehouse_broker::topology::headers;

use super::Outbound;

impl Outbound {
    /// Publishes `data` (confirmed) to the retry queue of `route` for `delay_ms`, declaring it
    /// first if this connection has not.
    ///
    /// # Errors
    /// When the broker does not take or confirm it.
    pub async fn retry(
        &self,
        route: &str,
        delay_ms: u64,
        data: &[u8],
        props: &BasicProperties,
    ) -> Result<(), PublishError> {
        let queue = self.retry_queue(route, delay_ms).await?;
        let props = without_replay(props);
        self.publisher.publish_persistent(&self.topology.retry_exchange(), &queue, data, props).await
    }

    async fn retry_queue(&self, route: &str, delay_ms: u64) -> Result<String, PublishError> {
        let name = self.topology.retry_queue(route, delay_ms);
        let known =
            self.retry_queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&name);
        if !known {
            let replicated = self.catalog.class_of_route(route).is_some_and(|q| !q.lanes().is_empty());
            self.topology.declare_retry_queue(self.publisher.channel(), route, delay_ms, replicated).await?;
            self.retry_queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.clone());
        }
        Ok(name)
    }
}

/// The properties without the replay marker (a replay resets attempts once, not on every
/// retry).
pub fn without_replay(props: &BasicProperties) -> BasicProperties {
    let Some(h) = props.headers() else {
        return props.clone();
    };
    let mut kept = FieldTable::default();
    for (k, v) in h.inner() {
        if k.as_str() != headers::REPLAY {
            kept.insert(k.clone(), v.clone());
        }
    }
    props.clone().with_headers(kept)
}
