//! Where an answer goes and how it is sealed: under the reply key of the session the request
//! travelled in, bound to its correlation id, job id and client, for the reply queue named
//! *inside* the vouched request ([`ReplyTarget`]) — never whatever a delivery's AMQP
//! properties say, which anyone who can publish to the broker may set. Sending is
//! `outbound::reply`'s.

use gatehouse_protocol::crypto::CryptoError;
use gatehouse_protocol::{JobEnvelope, JobStatus, ReplyTo, SealedReply, Vouched};

use super::sessions::Sessions;

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

/// `status` sealed for `target`'s waiting caller: the body to publish, to the reply queue and
/// under the correlation id of `target.reply`. `None` when nobody waits; an error when the
/// session cannot be verified (logged by the caller; the status stays queryable).
///
/// # Errors
/// When the session is not one the worker trusts, or sealing fails.
pub fn seal(
    sessions: &Sessions,
    target: &ReplyTarget,
    status: &JobStatus,
) -> Option<Result<Vec<u8>, CryptoError>> {
    let reply = target.reply.as_ref()?;
    let sealed = sessions
        .get(&target.key_id, &target.session)
        .and_then(|session| SealedReply::seal(status, &session, &reply.correlation_id, &target.client));
    Some(sealed.and_then(|r| serde_json::to_vec(&r).map_err(|_| CryptoError::Malformed)))
}
