//! The gatekeeper's keys: it signs every message it publishes, seals job payloads to the
//! worker, trusts only replies signed by the worker, and opens what the worker sealed to it.

use gatehouse_protocol::crypto::{OpeningKey, PairKey, SigningKey, Verifier};
use gatehouse_protocol::keys::{self, KeyFileError};

use crate::settings::KeySettings;

pub struct GatekeeperKeys {
    pub signing: SigningKey,
    pub opening: OpeningKey,
    pub worker: Verifier,
    pub worker_sealing: [u8; 32],
    /// Opens the worker's replies (static agreement, derived once).
    pub replies: PairKey,
}

impl GatekeeperKeys {
    /// # Errors
    /// When a key file is missing or malformed.
    pub fn load(s: &KeySettings) -> Result<Self, KeyFileError> {
        let opening = keys::opening_key(&s.sealing_key)?;
        let worker_sealing = keys::sealing_key(&s.worker_sealing_key)?;
        let replies = PairKey::new(&opening, &worker_sealing)
            .map_err(|e| KeyFileError::new(&s.worker_sealing_key, e))?;
        Ok(Self {
            signing: keys::signing_key(&s.signing_key)?,
            opening,
            worker: keys::verifier(&s.worker_signing_keys)?,
            worker_sealing,
            replies,
        })
    }
}
