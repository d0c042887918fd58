//! Answers to a waiting request: sealed under the reply key of the session the request
//! travelled in, bound to its correlation id, job id and client, and sent to the reply queue
//! named *inside* the vouched request ([`ReplyTarget`]) — never to whatever a delivery's AMQP
//! properties say, which anyone who can publish to the broker may set.
//!
//! Replies are a courtesy to a waiting caller, not the record: the outcome is already
//! committed, and `GET /v1/jobs/{id}` reads it from storage. So they are published without
//! confirms, and a failed reply is logged, never retried.

use gatehouse_broker::lapin::BasicProperties;
use gatehouse_broker::lapin::options::BasicPublishOptions;
use gatehouse_protocol::{JobEnvelope, JobStatus, ReplyTo, SealedReply, Vouched};

use crate::consumer::Context;

/// Where the answer about a job goes, if anyone waits for it, and what it is sealed under.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplyTarget {
    /// The vouched reply queue and correlation id (none: nobody waits).
    pub reply: Option<ReplyTo>,
    /// The client the job (or query) belongs to: bound into the reply.
    pub client: String,
    /// The session the request travelled in (signing key id and session header): the reply
    /// is sealed under that session's reply key.
    pub key_id: String,
    pub session: String,
}

impl ReplyTarget {
    /// The target of a job that arrived in `vouched`.
    pub fn of(env: &JobEnvelope, vouched: &Vouched<'_>) -> Self {
        Self::new(env.reply.clone(), &env.client, vouched)
    }

    pub fn new(reply: Option<ReplyTo>, client: &str, vouched: &Vouched<'_>) -> Self {
        Self {
            reply,
            client: client.to_owned(),
            key_id: vouched.key_id.clone(),
            session: vouched.session.clone(),
        }
    }
}

/// Sends `status` to `target` if anyone waits for it.
pub async fn send(ctx: &Context, target: &ReplyTarget, status: &JobStatus) {
    let Some(reply) = &target.reply else { return };
    let sealed = ctx
        .keys
        .sessions
        .get(&target.key_id, &target.session)
        .and_then(|session| SealedReply::seal(status, &session, &reply.correlation_id, &target.client));
    let body = match sealed.map(|r| serde_json::to_vec(&r)) {
        Ok(Ok(b)) => b,
        _ => return tracing::error!(job_id = %status.id, "cannot seal the reply"),
    };
    // The correlation id lets the gatekeeper find the waiting request (it is also bound inside
    // the seal); every other property costs the broker.
    let props = BasicProperties::default().with_correlation_id(reply.correlation_id.as_str().into());
    let exchange = ctx.topology.replies_exchange();
    let sent = ctx
        .replies
        .basic_publish(
            exchange.as_str().into(),
            reply.queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await;
    if let Err(e) = sent {
        tracing::warn!(error = %e, job_id = %status.id, "reply not sent; the caller can query the status");
    }
}
