//! What travels through the broker, gatekeeper → worker and back.
//!
//! The payload of a job never travels in the clear: the gatekeeper seals it to the worker in
//! its current [`Session`] ([`SealedJob`]), and the worker seals every reply under that
//! session's reply key ([`SealedReply`]), bound to the request's correlation id, job id and
//! client. Routing and ordering need only the plaintext metadata. Every message from the
//! gatekeeper travels [`Vouched`] for: with its session and a MAC of its exact bytes — the
//! reply target ([`ReplyTo`]) included, so that nobody with broker access can send a job's
//! answer anywhere else.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::crypto::{CryptoError, Sealed, Session};
use crate::{JobId, JobStatus, Priority, Sequence};

/// One accepted job, with its payload in the clear: what the worker's handlers see.
///
/// `client` is the identity the gatekeeper authenticated; the worker acts on it and on
/// nothing the client claimed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobEnvelope {
    pub id: JobId,
    pub kind: String,
    pub client: String,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<Sequence>,
    pub payload: Value,
    /// Unix time in milliseconds when the gatekeeper accepted the job.
    pub submitted_at_ms: u64,
    /// Not to run before this unix time in milliseconds (a delayed job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// Where the answer goes when the client waits: vouched for with the job, never taken from
    /// the delivery's AMQP properties (which anyone who can publish may set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyTo>,
    /// The W3C trace id of the request that submitted it: the worker's log lines for the job
    /// carry it, like the gatekeeper's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The gatekeeper's span of that request (16 hex digits): the worker's spans for the job
    /// are its children in the trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// The fair shard of its class the gatekeeper published it to (its client's place in
    /// the policy): where the worker sends it back to when it was held.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shard: u8,
    /// Its client's weight when clients take turns (the policy's `share`, default 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub share: u16,
    /// The client's idempotency key: fields the client sealed itself are bound to it
    /// ([`crate::fields::FieldAad`]). Travels sealed, as the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The batch whose `on_complete` job this is: it runs once every job of the batch is
    /// decided, and its handler is given the batch's summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completes: Option<JobId>,
    /// The jobs (of the same client) it waits for: it runs once every one is decided, or ends
    /// `cancelled` (`parent-failed`) when one did not succeed, unless `on_parent_failure` says
    /// `run`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    #[serde(default, skip_serializing_if = "ParentFailure::is_cancel")]
    pub on_parent_failure: ParentFailure,
}

/// A reply target: the gatekeeper instance's reply queue and the waiting request's
/// correlation id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyTo {
    pub queue: String,
    pub correlation_id: String,
}

/// A job as it travels: the payload sealed to the worker, bound to the job's id, kind and
/// client (moving it to another job fails to open).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SealedJob {
    pub id: JobId,
    pub kind: String,
    pub client: String,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<Sequence>,
    pub payload: Sealed,
    pub submitted_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyTo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shard: u8,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub share: u16,
    /// The idempotency key, sealed as the payload is (bound to the job's id, kind and client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<Sealed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completes: Option<JobId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    #[serde(default, skip_serializing_if = "ParentFailure::is_cancel")]
    pub on_parent_failure: ParentFailure,
}

/// What becomes of a job one of whose parents (`after`) did not succeed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParentFailure {
    /// It ends `cancelled` (reason `parent-failed`), and so do the jobs waiting for it.
    #[default]
    Cancel,
    /// It runs all the same (its handler sees how each parent ended).
    Run,
}

impl ParentFailure {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
    fn is_cancel(&self) -> bool {
        *self == Self::Cancel
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_zero(n: &u8) -> bool {
    *n == 0
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_one(n: &u16) -> bool {
    *n == 1
}

fn one() -> u16 {
    1
}

fn job_aad(id: &JobId, kind: &str, client: &str) -> Vec<u8> {
    [id.as_str(), kind, client].join("\0").into_bytes()
}

fn key_aad(id: &JobId, kind: &str, client: &str) -> Vec<u8> {
    [id.as_str(), kind, client, "idempotency key"].join("\0").into_bytes()
}

impl JobEnvelope {
    /// Seals the payload to the worker in `session`.
    ///
    /// # Errors
    /// Without system randomness.
    pub fn seal(&self, session: &Session) -> Result<SealedJob, CryptoError> {
        let plain = serde_json::to_vec(&self.payload).map_err(|_| CryptoError::Malformed)?;
        Ok(SealedJob {
            id: self.id.clone(),
            kind: self.kind.clone(),
            client: self.client.clone(),
            priority: self.priority,
            sequence: self.sequence.clone(),
            payload: session.seal(&plain, &job_aad(&self.id, &self.kind, &self.client))?,
            idempotency_key: match &self.idempotency_key {
                Some(k) => Some(session.seal(k.as_bytes(), &key_aad(&self.id, &self.kind, &self.client))?),
                None => None,
            },
            completes: self.completes.clone(),
            after: self.after.clone(),
            on_parent_failure: self.on_parent_failure,
            submitted_at_ms: self.submitted_at_ms,
            not_before_ms: self.not_before_ms,
            reply: self.reply.clone(),
            trace_id: self.trace_id.clone(),
            span_id: self.span_id.clone(),
            shard: self.shard,
            share: self.share,
        })
    }
}

impl SealedJob {
    /// Opens the payload in the session it was sealed in.
    ///
    /// # Errors
    /// When it was sealed in another session or anything bound to the payload was altered.
    pub fn open(self, session: &Session) -> Result<JobEnvelope, CryptoError> {
        let plain = session.open(&self.payload, &job_aad(&self.id, &self.kind, &self.client))?;
        let payload = serde_json::from_slice(&plain).map_err(|_| CryptoError::Malformed)?;
        let idempotency_key = match &self.idempotency_key {
            Some(sealed) => {
                let key = session.open(sealed, &key_aad(&self.id, &self.kind, &self.client))?;
                Some(String::from_utf8(key).map_err(|_| CryptoError::Malformed)?)
            }
            None => None,
        };
        Ok(JobEnvelope {
            idempotency_key,
            completes: self.completes,
            after: self.after,
            on_parent_failure: self.on_parent_failure,
            id: self.id,
            kind: self.kind,
            client: self.client,
            priority: self.priority,
            sequence: self.sequence,
            payload,
            submitted_at_ms: self.submitted_at_ms,
            not_before_ms: self.not_before_ms,
            reply: self.reply,
            trace_id: self.trace_id,
            span_id: self.span_id,
            shard: self.shard,
            share: self.share,
        })
    }

    /// The metadata, with a null payload: for records that must not hold the payload.
    pub fn metadata(&self) -> JobEnvelope {
        JobEnvelope {
            id: self.id.clone(),
            kind: self.kind.clone(),
            client: self.client.clone(),
            priority: self.priority,
            sequence: self.sequence.clone(),
            payload: Value::Null,
            idempotency_key: None,
            completes: self.completes.clone(),
            after: self.after.clone(),
            on_parent_failure: self.on_parent_failure,
            submitted_at_ms: self.submitted_at_ms,
            not_before_ms: self.not_before_ms,
            reply: self.reply.clone(),
            trace_id: self.trace_id.clone(),
            span_id: self.span_id.clone(),
            shard: self.shard,
            share: self.share,
        }
    }
}

/// Whose a job's message is and its client's weight, read from the metadata alone (nothing is
/// verified or opened): what the worker takes turns between clients by before it starts a job.
/// A message that does not read so is nobody's in particular (and fails on its own later).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Turn {
    pub client: String,
    #[serde(default = "one")]
    pub share: u16,
}

impl Turn {
    /// The client and share of a job message; `None` when it is not one.
    pub fn of(body: &[u8]) -> Option<Self> {
        let vouched = Vouched::parse(body).ok()?;
        serde_json::from_slice(vouched.message()).ok()
    }
}

/// A message from the gatekeeper as it travels: its exact JSON (a [`SealedJob`] or a
/// [`ControlRequest`]) with what vouches for it — the id of the key that signed the sender's
/// session, the session ([`Session::header`]) and an HMAC of exactly those bytes under it.
///
/// The provenance travels in the body, not in AMQP headers: on RabbitMQ 3.10 three such
/// headers cost the broker about 40 % of its confirmed-publish rate and tripled its tail
/// latency (`gatehouse bench`), while body bytes are nearly free. It also keeps a stored or
/// dead-lettered copy verifiable by itself.
#[derive(Debug, Serialize, Deserialize)]
pub struct Vouched<'a> {
    /// The body's format: [`Vouched::VERSION`]. A worker refuses any other version by name
    /// (`unsupported_version`) instead of mistaking it for a forgery. Bodies written before the
    /// field existed (queued, parked) are version 1.
    #[serde(default = "version_1")]
    pub v: u32,
    pub key_id: String,
    pub session: String,
    pub mac: String,
    #[serde(borrow)]
    pub message: &'a RawValue,
}

impl<'a> Vouched<'a> {
    /// The format this build writes and reads.
    pub const VERSION: u32 = 1;

    /// The body that carries `message` (JSON) vouched for in `session`.
    ///
    /// # Errors
    /// When `message` is not JSON.
    pub fn wrap(session: &Session, message: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let text = std::str::from_utf8(message).map_err(|_| CryptoError::Malformed)?;
        let message: &RawValue = serde_json::from_str(text).map_err(|_| CryptoError::Malformed)?;
        let vouched = Vouched {
            v: Self::VERSION,
            key_id: session.key_id().to_owned(),
            session: session.header(),
            mac: session.mac(message.get().as_bytes()),
            message,
        };
        serde_json::to_vec(&vouched).map_err(|_| CryptoError::Malformed)
    }

    /// Reads a body made by [`Vouched::wrap`] (nothing is checked yet).
    ///
    /// # Errors
    /// [`CryptoError::Version`] for a body of another format version;
    /// [`CryptoError::BadSignature`] when it carries no provenance: not vouched for at all.
    pub fn parse(body: &'a [u8]) -> Result<Self, CryptoError> {
        #[derive(Deserialize)]
        struct Versioned {
            #[serde(default = "version_1")]
            v: u32,
        }
        match serde_json::from_slice::<Self>(body) {
            Ok(vouched) if vouched.v == Self::VERSION => Ok(vouched),
            Ok(other) => Err(CryptoError::Version(other.v)),
            // Another version may differ in more than its number.
            Err(_) => match serde_json::from_slice::<Versioned>(body) {
                Ok(Versioned { v }) if v != Self::VERSION => Err(CryptoError::Version(v)),
                _ => Err(CryptoError::BadSignature),
            },
        }
    }

    /// Checks the MAC of the message under its session, which `session` resolves from (key
    /// id, session header) and verifies — typically from a cache, since a session carries many
    /// messages. Answers the session, which opens a sealed payload.
    ///
    /// # Errors
    /// [`CryptoError::BadSignature`] when the MAC does not check; whatever `session` answers
    /// for a session it cannot verify.
    pub fn verify<S: AsRef<Session>>(
        &self,
        session: impl FnOnce(&str, &str) -> Result<S, CryptoError>,
    ) -> Result<S, CryptoError> {
        let s = session(&self.key_id, &self.session)?;
        s.as_ref().check_mac(self.message.get().as_bytes(), &self.mac)?;
        Ok(s)
    }

    /// The message's exact bytes.
    pub fn message(&self) -> &'a [u8] {
        self.message.get().as_bytes()
    }
}

fn version_1() -> u32 {
    1
}

/// A query from the gatekeeper to the worker over the control queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The status of `id`, answered (to `reply`) only if `client` owns it. `minted_at_ms`:
    /// when the gatekeeper minted the id, if the id says (ids derived from an idempotency key
    /// do not); a job the worker does not know that is older than its retention is `expired`.
    Status {
        id: JobId,
        client: String,
        sent_at_ms: u64,
        reply: ReplyTo,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        minted_at_ms: Option<u64>,
    },
    /// Cancel `id` if `client` owns it and it has not ended; answered (to `reply`) with its
    /// status afterwards.
    Cancel { id: JobId, client: String, sent_at_ms: u64, reply: ReplyTo },
    /// `client`'s jobs that `query` selects, answered (to `reply`) as the status of `id` — an id
    /// the gatekeeper minted for this query alone, so that the answer is sealed and bound like a
    /// status — with the page ([`crate::listing::JobPage`]) as its result.
    List { id: JobId, client: String, query: crate::listing::JobQuery, sent_at_ms: u64, reply: ReplyTo },
    /// Batch `id` ([`crate::batch::BatchSummary`] as the result of its status), answered (to
    /// `reply`) only if `client` owns it.
    Batch {
        id: JobId,
        client: String,
        sent_at_ms: u64,
        reply: ReplyTo,
        /// A workflow's event stream: per step, in order, the last transition it has seen; the
        /// answer then carries the transitions after those.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        events_after: Option<Vec<u64>>,
    },
    /// The state transitions of `id` after number `after` (and its status now), answered (to
    /// `reply`) only if `client` owns it; for the live event stream.
    Events {
        id: JobId,
        client: String,
        after: u64,
        sent_at_ms: u64,
        reply: ReplyTo,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        minted_at_ms: Option<u64>,
    },
}

/// A worker's answer, sealed under the reply key of the session its request travelled in
/// (named by [`Session::id`]) and bound to the request's correlation id, job id and client: a
/// reply opens only for the request that waits for exactly that job of exactly that client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SealedReply {
    pub session: String,
    pub status: Sealed,
}

fn reply_aad(correlation_id: &str, job: &JobId, client: &str) -> Vec<u8> {
    [b"gatehouse reply v1".as_slice(), correlation_id.as_bytes(), job.as_str().as_bytes(), client.as_bytes()]
        .join(&0u8)
}

impl SealedReply {
    /// # Errors
    /// Without system randomness.
    pub fn seal(
        status: &JobStatus,
        session: &Session,
        correlation_id: &str,
        client: &str,
    ) -> Result<Self, CryptoError> {
        let plain = serde_json::to_vec(status).map_err(|_| CryptoError::Malformed)?;
        let status = session.seal_reply(&plain, &reply_aad(correlation_id, &status.id, client))?;
        Ok(Self { session: session.id(), status })
    }

    /// Opens a reply expected for job `job` of `client`, and checks that it speaks of that job.
    ///
    /// # Errors
    /// When it was sealed in another session, for another request, job or client, or altered.
    pub fn open(
        &self,
        session: &Session,
        correlation_id: &str,
        job: &JobId,
        client: &str,
    ) -> Result<JobStatus, CryptoError> {
        let plain = session.open_reply(&self.status, &reply_aad(correlation_id, job, client))?;
        let status: JobStatus = serde_json::from_slice(&plain).map_err(|_| CryptoError::Malformed)?;
        if &status.id != job {
            return Err(CryptoError::Open);
        }
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::JobState;

    #[test]
    fn a_sealed_job_travels_without_its_payload_and_opens_whole() {
        use crate::crypto::{OpeningKey, SigningKey, Verifier};
        let worker = OpeningKey::from_bytes(&OpeningKey::generate().unwrap()).unwrap();
        let gk = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let session = Session::start(&gk, &worker.public_key(), 1).unwrap();
        let verifier = Verifier::new([gk.public_key()]).unwrap();
        let opened = Session::accept(&verifier, gk.id(), &session.header(), &worker).unwrap();
        let env = JobEnvelope {
            id: JobId::from_bytes([1; 16]),
            kind: "vault.put".into(),
            client: "alice".into(),
            priority: Priority::new(5).unwrap(),
            sequence: None,
            payload: json!({"record": {"card": "4111-MARKER"}}),
            submitted_at_ms: 1,
            not_before_ms: None,
            reply: Some(ReplyTo { queue: "gatehouse.reply.a".into(), correlation_id: "c1".into() }),
            trace_id: None,
            span_id: None,
            shard: 0,
            share: 1,
            idempotency_key: Some("order-KEYMARK".into()),
            completes: None,
            after: vec![JobId::from_bytes([2; 16])],
            on_parent_failure: ParentFailure::Run,
        };
        let wire = serde_json::to_string(&env.seal(&session).unwrap()).unwrap();
        assert!(!wire.contains("MARKER") && !wire.contains("KEYMARK"), "{wire}");
        let sealed: SealedJob = serde_json::from_str(&wire).unwrap();
        let back = sealed.clone().open(&opened).unwrap();
        assert_eq!((back.payload, back.idempotency_key), (env.payload, env.idempotency_key));
        assert_eq!(
            (back.after, back.on_parent_failure),
            (env.after, ParentFailure::Run),
            "its parents travel"
        );
        // The payload cannot be moved to another client's job.
        let mut moved = sealed;
        moved.client = "mallory".into();
        assert!(moved.open(&opened).is_err());
    }

    #[test]
    fn a_vouched_message_checks_only_unaltered_and_in_its_session() {
        use crate::crypto::{OpeningKey, SigningKey, Verifier};
        let worker = OpeningKey::from_bytes(&OpeningKey::generate().unwrap()).unwrap();
        let gk = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let verifier = Verifier::new([gk.public_key()]).unwrap();
        let accept = |id: &str, h: &str| Session::accept(&verifier, id, h, &worker).map(Box::new);
        let session = Session::start(&gk, &worker.public_key(), 1).unwrap();
        let body = Vouched::wrap(&session, br#"{"op":"status","n":1}"#).unwrap();
        let v = Vouched::parse(&body).unwrap();
        assert!(v.verify(accept).is_ok());
        assert_eq!(v.message(), br#"{"op":"status","n":1}"#);

        let altered = String::from_utf8(body.clone()).unwrap().replace(r#""n":1"#, r#""n":2"#);
        assert_eq!(
            Vouched::parse(altered.as_bytes()).unwrap().verify(accept).err(),
            Some(CryptoError::BadSignature)
        );
        let other = Session::start(&gk, &worker.public_key(), 2).unwrap();
        let moved = String::from_utf8(body).unwrap().replace(&session.header(), &other.header());
        assert_eq!(
            Vouched::parse(moved.as_bytes()).unwrap().verify(accept).err(),
            Some(CryptoError::BadSignature)
        );
        assert_eq!(Vouched::parse(br#"{"op":"status"}"#).err(), Some(CryptoError::BadSignature));
    }

    #[test]
    fn a_body_of_another_format_version_is_named_as_such() {
        use crate::crypto::{OpeningKey, SigningKey};
        let worker = OpeningKey::from_bytes(&OpeningKey::generate().unwrap()).unwrap();
        let gk = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let session = Session::start(&gk, &worker.public_key(), 1).unwrap();
        let body = String::from_utf8(Vouched::wrap(&session, br#"{"op":"status"}"#).unwrap()).unwrap();
        assert!(body.starts_with(r#"{"v":1,"#), "{body}");
        let next = body.replacen(r#""v":1"#, r#""v":2"#, 1);
        assert_eq!(Vouched::parse(next.as_bytes()).err(), Some(CryptoError::Version(2)));
        // A later format may differ in more than its number.
        assert_eq!(Vouched::parse(br#"{"v":3,"envelope":"..."}"#).err(), Some(CryptoError::Version(3)));
        // Written before the field existed (still queued or parked): version 1.
        let unversioned = body.replacen(r#""v":1,"#, "", 1);
        assert_eq!(Vouched::parse(unversioned.as_bytes()).unwrap().message(), br#"{"op":"status"}"#);
        assert_eq!(Vouched::parse(br#"{"v":1,"op":"status"}"#).err(), Some(CryptoError::BadSignature));
    }

    #[test]
    fn replies_are_bound_to_their_request_job_and_client() {
        use crate::crypto::{OpeningKey, SigningKey, Verifier};
        let worker = OpeningKey::from_bytes(&OpeningKey::generate().unwrap()).unwrap();
        let gk = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let sent = Session::start(&gk, &worker.public_key(), 1).unwrap();
        let verifier = Verifier::new([gk.public_key()]).unwrap();
        let got = Session::accept(&verifier, gk.id(), &sent.header(), &worker).unwrap();
        let (job, other) = (JobId::from_bytes([2; 16]), JobId::from_bytes([3; 16]));
        let status = JobStatus::new(job.clone(), JobState::Succeeded);
        let r = SealedReply::seal(&status, &got, "c1", "alice").unwrap();
        assert_eq!(r.session, sent.id());
        assert_eq!(r.open(&sent, "c1", &job, "alice").unwrap(), status);
        assert!(r.open(&sent, "c2", &job, "alice").is_err(), "another request");
        assert!(r.open(&sent, "c1", &other, "alice").is_err(), "another job");
        assert!(r.open(&sent, "c1", &job, "mallory").is_err(), "another client");
    }
}
