//! Answers to `reply_to` with the request's `correlation_id`: sealed under the
//! worker–gatekeeper pair key and bound to the correlation id (which authenticates it: only
//! the two of them hold that key), sent through the replies exchange.
//!
//! Replies are a courtesy to a waiting caller, not the record: the outcome is already
//! committed, and `GET /v1/jobs/{id}` reads it from storage. So they are published without
//! confirms, and a failed reply is logged, never retried.

use gatehouse_broker::lapin::BasicProperties;
use gatehouse_broker::lapin::options::BasicPublishOptions;
use gatehouse_protocol::{JobStatus, SealedReply};

use crate::apply::ReplyTarget;
use crate::consumer::Context;

/// Sends `status` to `target` if it names a reply queue and a correlation id.
pub async fn send(ctx: &Context, target: &ReplyTarget, status: &JobStatus) {
    let (Some(reply_to), Some(correlation_id)) = (&target.reply_to, &target.correlation_id) else { return };
    let sealed = SealedReply::seal(status, &ctx.keys.replies, correlation_id);
    let body = match sealed.map(|r| serde_json::to_vec(&r)) {
        Ok(Ok(b)) => b,
        _ => return tracing::error!(job_id = %status.id, "cannot seal the reply"),
    };
    // The correlation id is all the gatekeeper needs (the job id is inside, sealed); every
    // other property costs the broker.
    let props = BasicProperties::default().with_correlation_id(correlation_id.as_str().into());
    let exchange = ctx.topology.replies_exchange();
    let sent = ctx
        .replies
        .basic_publish(
            exchange.as_str().into(),
            reply_to.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await;
    if let Err(e) = sent {
        tracing::warn!(error = %e, job_id = %status.id, "reply not sent; the caller can query the status");
    }
}
