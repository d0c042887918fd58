//! Answers to `reply_to` with the request's `correlation_id`.
//!
//! Replies are a courtesy to a waiting caller, not the record: the outcome is already
//! committed, and `GET /v1/jobs/{id}` reads it from storage. So they are published without
//! confirms, and a failed reply is logged, never retried.

use gatehouse_broker::lapin::options::BasicPublishOptions;
use gatehouse_broker::lapin::{BasicProperties, Channel};
use gatehouse_protocol::JobStatus;

use crate::apply::ReplyTarget;

/// Sends `status` to `target` if it names a reply queue.
pub async fn send(channel: &Channel, target: &ReplyTarget, status: &JobStatus) {
    let Some(reply_to) = &target.reply_to else {
        return;
    };
    let body = match serde_json::to_vec(status) {
        Ok(b) => b,
        Err(e) => return tracing::error!(error = %e, "cannot encode reply"),
    };
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(status.id.as_str().into());
    if let Some(c) = &target.correlation_id {
        props = props.with_correlation_id(c.as_str().into());
    }
    let sent = channel
        .basic_publish("".into(), reply_to.as_str().into(), BasicPublishOptions::default(), &body, props)
        .await;
    if let Err(e) = sent {
        tracing::warn!(error = %e, job_id = %status.id, "reply not sent; the caller can query the status");
    }
}
