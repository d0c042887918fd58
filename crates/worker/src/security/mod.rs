//! What the worker trusts and how it seals: it accepts only sessions signed by the
//! gatekeeper's keys ([`Sessions`]), opens job payloads and batches in them
//! ([`WorkerKeys::open`], refusing with a [`DeadReason`]), seals replies under each session's reply key
//! ([`reply::seal`]), checks operators' replay grants, and vouches for the jobs it makes itself.

pub mod reply;
pub mod sessions;

use std::time::Duration;

use gatehouse_protocol::batch::BatchMessage;
use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::crypto::{CryptoError, Session, SigningKey, Verifier};
use gatehouse_protocol::{JobEnvelope, SealedJob, Vouched, keys};

use crate::reasons::DeadReason;
use crate::settings::KeySettings;
pub use reply::ReplyTarget;
pub use sessions::Sessions;

/// What a message on a job queue holds, checked and opened. (Returned once per delivery and
/// taken apart at once: boxing the job, the common case, would cost an allocation per job.)
#[allow(clippy::large_enum_variant)]
pub enum Opened {
    Job(JobEnvelope, ReplyTarget),
    /// Jobs accepted whole ([`gatehouse_protocol::batch`]): recorded and held in one
    /// transaction, then each sent to its own queue.
    Batch(BatchMessage),
}

/// Everything the worker needs to check and open what arrives and to seal what leaves.
pub struct WorkerKeys {
    pub sessions: Sessions,
    pub max_message_age: Duration,
    /// The operators whose replay grants are honoured.
    operators: Verifier,
    /// Signs the jobs the worker makes itself (schedule firings); derived from its sealing key,
    /// so only the worker has it, and trusted like a gatekeeper's key.
    own_signing: SigningKey,
    /// The worker's own X25519 public key, to seal its own jobs to.
    own_public: [u8; 32],
    /// Keys the ids of schedule firings: nobody without the worker's secret can compute one,
    /// so no gatekeeper can submit a job under a future firing's id and pre-empt it.
    firings: ring::hmac::Key,
}

/// What the firing-id key is derived for.
const FIRING_IDS: &str = "gatehouse schedule firing ids v1";

/// What the worker's own signing key is derived for.
const OWN_JOBS: &str = "gatehouse worker-made jobs v1";

/// How far in the future a submit time may be (clock skew between the two hosts).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

impl WorkerKeys {
    /// # Errors
    /// When a key file is missing or malformed.
    pub fn load(s: &KeySettings) -> Result<Self, keys::KeyFileError> {
        let opening = keys::opening_key(&s.sealing_key)?;
        let bad = |e: CryptoError| keys::KeyFileError::new(&s.sealing_key, e);
        let own_signing = opening.derive_signing_key(OWN_JOBS).map_err(bad)?;
        let own_public = opening.public_key();
        let firings =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &opening.derive_secret(FIRING_IDS).map_err(bad)?);
        let mut trusted = keys::verifier(&s.gatekeeper_signing_keys)?;
        trusted.trust(own_signing.public_key()).map_err(bad)?;
        Ok(Self {
            sessions: Sessions::new(trusted, opening),
            max_message_age: Duration::from_secs(s.max_message_age_s),
            operators: keys::verifier(&s.operator_keys)?,
            own_signing,
            own_public,
            firings,
        })
    }

    /// The id of schedule `name`'s firing at `fire_ms`: the same for every worker holding this
    /// sealing key, unknown to anyone else.
    pub fn firing_id(&self, name: &str, fire_ms: i64) -> gatehouse_protocol::JobId {
        let tag = ring::hmac::sign(
            &self.firings,
            &[b"gatehouse schedule firing\0", name.as_bytes(), b"\0", &fire_ms.to_be_bytes()].concat(),
        );
        let mut raw = [0u8; 16];
        raw.copy_from_slice(&tag.as_ref()[..16]);
        gatehouse_protocol::JobId::from_bytes(raw)
    }

    /// The message of a job the worker makes itself (a schedule firing), vouched for with its
    /// own key and sealed to itself, as a gatekeeper would: it is checked like any on arrival.
    ///
    /// # Errors
    /// Without system randomness.
    pub fn own_job(&self, env: &JobEnvelope) -> Result<Vec<u8>, CryptoError> {
        let session = Session::start(&self.own_signing, &self.own_public, now_ms().unsigned_abs())?;
        let sealed = serde_json::to_vec(&env.seal(&session)?).map_err(|_| CryptoError::Malformed)?;
        Vouched::wrap(&session, &sealed)
    }

    /// Checks an operator's replay grant for the message `body`; answers when it was issued.
    ///
    /// # Errors
    /// When no trusted operator signed it for this body, or it expired.
    pub fn check_replay(
        &self,
        grant: &str,
        job_id: &str,
        body: &[u8],
    ) -> Result<gatehouse_protocol::replay::Grant, CryptoError> {
        gatehouse_protocol::replay::verify(&self.operators, grant, job_id, body, now_ms().unsigned_abs())
    }

    /// Whether a message sent at `sent_at_ms` is within `max_age` of now.
    pub fn is_fresh(sent_at_ms: u64, max_age: Duration) -> bool {
        let now = now_ms().unsigned_abs();
        sent_at_ms <= now + MAX_CLOCK_SKEW.as_millis() as u64
            && now.saturating_sub(sent_at_ms) <= max_age.as_millis() as u64
    }

    /// Checks a message from a job queue and opens it: provenance (session and MAC), then
    /// metadata, freshness, and the sealed payload. Answers the job and where its answer goes,
    /// or the batch.
    ///
    /// # Errors
    /// The reason to dead-letter it with: [`DeadReason::BadSignature`] (no session, one no
    /// trusted key signed, a MAC that does not check), [`DeadReason::UnsupportedVersion`],
    /// [`DeadReason::Undecodable`], [`DeadReason::Stale`] (older than `max_message_age_s`, or
    /// from the future), [`DeadReason::Unsealable`].
    pub fn open(&self, body: &[u8]) -> Result<Opened, DeadReason> {
        let vouched = Vouched::parse(body).map_err(|e| match e {
            CryptoError::Version(_) => DeadReason::UnsupportedVersion,
            _ => DeadReason::BadSignature,
        })?;
        let session =
            vouched.verify(|id, s| self.sessions.get(id, s)).map_err(|_| DeadReason::BadSignature)?;
        // A batch's message starts with its id (serde writes fields in their order).
        if vouched.message().starts_with(br#"{"batch":"#) {
            let batch: BatchMessage =
                serde_json::from_slice(vouched.message()).map_err(|_| DeadReason::Undecodable)?;
            self.check_age(batch.submitted_at_ms, None)?;
            return Ok(Opened::Batch(batch));
        }
        let sealed: SealedJob =
            serde_json::from_slice(vouched.message()).map_err(|_| DeadReason::Undecodable)?;
        self.check_age(sealed.submitted_at_ms, sealed.not_before_ms)?;
        let env = sealed.open(&session).map_err(|_: CryptoError| DeadReason::Unsealable)?;
        let target = ReplyTarget::of(&env, &vouched);
        Ok(Opened::Job(env, target))
    }

    /// [`DeadReason::Stale`] for a message submitted longer than `max_message_age_s` ago (a
    /// delayed job's age counts from its time: it may wait longer than the limit), or from the
    /// future.
    fn check_age(&self, submitted_at_ms: u64, not_before_ms: Option<u64>) -> Result<(), DeadReason> {
        let reference = not_before_ms.map_or(submitted_at_ms, |at| at.max(submitted_at_ms));
        let now = now_ms().unsigned_abs();
        let submitted_ok = submitted_at_ms <= now + MAX_CLOCK_SKEW.as_millis() as u64;
        if !submitted_ok || now.saturating_sub(reference) > self.max_message_age.as_millis() as u64 {
            return Err(DeadReason::Stale);
        }
        Ok(())
    }
}
