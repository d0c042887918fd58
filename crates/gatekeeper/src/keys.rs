//! The gatekeeper's keys: it signs a short session with the worker, seals job payloads and
//! authenticates every message it publishes in that session, and opens the worker's replies
//! under their pair key.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use gatehouse_protocol::crypto::{CryptoError, PairKey, SESSION_LIFETIME_MS, Session, SigningKey};
use gatehouse_protocol::keys::{self, KeyFileError};

use crate::settings::KeySettings;

pub struct GatekeeperKeys {
    signing: SigningKey,
    worker_sealing: [u8; 32],
    /// Opens the worker's replies (static agreement, derived once).
    pub replies: PairKey,
    session: RwLock<Arc<Session>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl GatekeeperKeys {
    /// # Errors
    /// When a key file is missing or malformed.
    pub fn load(s: &KeySettings) -> Result<Self, KeyFileError> {
        let opening = keys::opening_key(&s.sealing_key)?;
        let worker_sealing = keys::sealing_key(&s.worker_sealing_key)?;
        let replies = PairKey::new(&opening, &worker_sealing)
            .map_err(|e| KeyFileError::new(&s.worker_sealing_key, e))?;
        let signing = keys::signing_key(&s.signing_key)?;
        let session = Session::start(&signing, &worker_sealing, now_ms())
            .map_err(|e| KeyFileError::new(&s.worker_sealing_key, e))?;
        Ok(Self { signing, worker_sealing, replies, session: RwLock::new(Arc::new(session)) })
    }

    /// The session to send in now; a new one every [`SESSION_LIFETIME_MS`].
    ///
    /// # Errors
    /// Without system randomness.
    pub fn session(&self) -> Result<Arc<Session>, CryptoError> {
        let now = now_ms();
        let current = |s: &Session| now.abs_diff(s.started_at_ms()) < SESSION_LIFETIME_MS;
        {
            let s = self.session.read().unwrap_or_else(PoisonError::into_inner);
            if current(&s) {
                return Ok(s.clone());
            }
        }
        let mut s = self.session.write().unwrap_or_else(PoisonError::into_inner);
        if !current(&s) {
            *s = Arc::new(Session::start(&self.signing, &self.worker_sealing, now)?);
            tracing::debug!("new session with the worker");
        }
        Ok(s.clone())
    }
}
