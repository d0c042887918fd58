//! The worker's keys: it signs replies, opens job payloads, seals replies to the gatekeeper,
//! trusts only the gatekeeper's signing keys, and encrypts what it stores.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gatehouse_protocol::crypto::{CryptoError, OpeningKey, PairKey, SigningKey, Verifier};
use gatehouse_protocol::{JobEnvelope, SealedJob, keys};

use crate::settings::KeySettings;

/// Everything the worker needs to check and open what arrives and to sign and seal what leaves.
pub struct WorkerKeys {
    pub signing: SigningKey,
    pub opening: OpeningKey,
    pub gatekeeper: Verifier,
    pub gatekeeper_sealing: [u8; 32],
    /// Seals replies for the gatekeeper (static agreement, derived once).
    pub replies: PairKey,
    pub max_message_age: Duration,
}

/// Why an arriving job is refused before anything runs; the dead-letter reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unsigned, badly signed, or signed by a key the worker does not trust.
    BadSignature,
    /// Submitted longer ago than `max_message_age_s` (or in the future).
    Stale,
    /// Signed, but the body is not a job.
    Undecodable,
    /// Signed, but the payload does not open with the worker's key.
    Unsealable,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Self::BadSignature => "bad_signature",
            Self::Stale => "stale",
            Self::Undecodable => "undecodable",
            Self::Unsealable => "unsealable",
        }
    }
}

/// How far in the future a submit time may be (clock skew between the two hosts).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl WorkerKeys {
    /// # Errors
    /// When a key file is missing or malformed.
    pub fn load(s: &KeySettings) -> Result<Self, keys::KeyFileError> {
        let opening = keys::opening_key(&s.sealing_key)?;
        let gatekeeper_sealing = keys::sealing_key(&s.gatekeeper_sealing_key)?;
        let replies = PairKey::new(&opening, &gatekeeper_sealing)
            .map_err(|e| keys::KeyFileError::new(&s.gatekeeper_sealing_key, e))?;
        Ok(Self {
            signing: keys::signing_key(&s.signing_key)?,
            opening,
            gatekeeper: keys::verifier(&s.gatekeeper_signing_keys)?,
            gatekeeper_sealing,
            replies,
            max_message_age: Duration::from_secs(s.max_message_age_s),
        })
    }

    /// Whether a message sent at `sent_at_ms` is within `max_age` of now.
    pub fn is_fresh(sent_at_ms: u64, max_age: Duration) -> bool {
        let now = now_ms();
        sent_at_ms <= now + MAX_CLOCK_SKEW.as_millis() as u64
            && now.saturating_sub(sent_at_ms) <= max_age.as_millis() as u64
    }

    /// Parses a job body that was already found correctly signed: metadata, freshness, then
    /// the sealed payload.
    ///
    /// # Errors
    /// The [`Refusal`] to dead-letter it with.
    pub fn open_job(&self, body: &[u8]) -> Result<JobEnvelope, Refusal> {
        let sealed: SealedJob = serde_json::from_slice(body).map_err(|_| Refusal::Undecodable)?;
        if !Self::is_fresh(sealed.submitted_at_ms, self.max_message_age) {
            return Err(Refusal::Stale);
        }
        sealed.open(&self.opening).map_err(|_: CryptoError| Refusal::Unsealable)
    }
}
