//! The gatekeeper's keys: it signs every message it publishes, seals job payloads to the
//! worker, trusts only replies signed by the worker, and opens what the worker sealed to it.

use gatehouse_protocol::crypto::{OpeningKey, SigningKey, Verifier};
use gatehouse_protocol::keys::{self, KeyFileError};

use crate::settings::KeySettings;

pub struct GatekeeperKeys {
    pub signing: SigningKey,
    pub opening: OpeningKey,
    pub worker: Verifier,
    pub worker_sealing: [u8; 32],
}

impl GatekeeperKeys {
    /// # Errors
    /// When a key file is missing or malformed.
    pub fn load(s: &KeySettings) -> Result<Self, KeyFileError> {
        Ok(Self {
            signing: keys::signing_key(&s.signing_key)?,
            opening: keys::opening_key(&s.sealing_key)?,
            worker: keys::verifier(&s.worker_signing_keys)?,
            worker_sealing: keys::sealing_key(&s.worker_sealing_key)?,
        })
    }
}
