//! Answers to a waiting caller, sealed for it (`security::reply`) and published to the reply
//! queue named inside the vouched request.
//!
//! Replies are a courtesy to a waiting caller, not the record: the outcome is already
//! committed, and `GET /v1/jobs/{id}` reads it from storage. So they are published without
//! confirms, and a failed reply is logged, never retried.

use gatehouse_broker::lapin::BasicProperties;
use gatehouse_broker::lapin::options::BasicPublishOptions;
use gatehouse_protocol::JobStatus;

use super::Outbound;
use crate::security::{ReplyTarget, reply};

impl Outbound {
    /// Sends `status` to `target` if anyone waits for it.
    pub async fn reply(&self, target: &ReplyTarget, status: &JobStatus) {
        let (Some(to), Some(sealed)) = (&target.reply, reply::seal(&self.keys.sessions, target, status))
        else {
            return;
        };
        let Ok(body) = sealed else {
            return tracing::error!(job_id = %status.id, "cannot seal the reply");
        };
        // The correlation id lets the gatekeeper find the waiting request (it is also bound
        // inside the seal); every other property costs the broker.
        let props = BasicProperties::default().with_correlation_id(to.correlation_id.as_str().into());
        let exchange = self.topology.replies_exchange();
        let sent = self
            .replies
            .basic_publish(
                exchange.as_str().into(),
                to.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, job_id = %status.id, "reply not sent; the caller can query the status");
        }
    }
}
