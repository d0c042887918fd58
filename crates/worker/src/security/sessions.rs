//! The gatekeeper's sessions, verified once and kept.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use gatehouse_protocol::crypto::{CryptoError, OpeningKey, Session, Verifier};
use gatehouse_protocol::{JobEnvelope, SealedJob, Vouched};

use super::reply::ReplyTarget;

/// The gatekeeper's sessions: each is verified (an Ed25519 signature and a key agreement) the
/// first time a message of it arrives, then kept, so that its other messages cost only a MAC
/// check and an AES-GCM open.
pub struct Sessions {
    gatekeeper: Verifier,
    opening: OpeningKey,
    verified: Mutex<Verified>,
}

#[derive(Default)]
struct Verified {
    by_header: HashMap<String, Arc<Session>>,
    order: VecDeque<String>,
}

/// Sessions kept; a gatekeeper starts one every 10 s, so this covers about ten minutes of a
/// dozen gatekeepers. Older ones are verified again when a message of theirs comes back.
const SESSIONS_KEPT: usize = 1024;

impl Sessions {
    pub fn new(gatekeeper: Verifier, opening: OpeningKey) -> Self {
        Self { gatekeeper, opening, verified: Mutex::default() }
    }

    /// The session a message names, verified.
    ///
    /// # Errors
    /// When the session is malformed or not signed by a trusted gatekeeper key.
    pub fn get(&self, key_id: &str, header: &str) -> Result<Arc<Session>, CryptoError> {
        let lookup = format!("{key_id} {header}");
        if let Some(s) = self.lock().by_header.get(&lookup) {
            return Ok(s.clone());
        }
        let session = Arc::new(Session::accept(&self.gatekeeper, key_id, header, &self.opening)?);
        let mut v = self.lock();
        if v.by_header.insert(lookup.clone(), session.clone()).is_none() {
            v.order.push_back(lookup);
        }
        while v.order.len() > SESSIONS_KEPT {
            if let Some(old) = v.order.pop_front() {
                v.by_header.remove(&old);
            }
        }
        Ok(session)
    }

    /// Checks and opens a stored job body (a parked job, kept as it arrived), with where its
    /// answer goes.
    ///
    /// # Errors
    /// What went wrong, for the record.
    pub fn open_stored(&self, body: &[u8]) -> Result<(JobEnvelope, ReplyTarget), String> {
        let vouched = Vouched::parse(body).map_err(|e| e.to_string())?;
        let session = vouched.verify(|id, s| self.get(id, s)).map_err(|e| e.to_string())?;
        let sealed: SealedJob = serde_json::from_slice(vouched.message()).map_err(|e| e.to_string())?;
        let env = sealed.open(&session).map_err(|e| e.to_string())?;
        let target = ReplyTarget::of(&env, &vouched);
        Ok((env, target))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Verified> {
        // Plain map operations: a panic cannot leave it half-updated.
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
