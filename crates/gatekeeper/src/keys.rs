//! The gatekeeper's keys: it signs a short session with the worker, seals job payloads and
//! authenticates every message it publishes in that session, and opens the worker's replies
//! under the reply key of the session their request went out in — for a short window only.

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError, RwLock};

use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::crypto::{CryptoError, SESSION_LIFETIME_MS, Session, SigningKey};
use gatehouse_protocol::keys::{self, KeyFileError};

use crate::settings::KeySettings;

/// How long the gatekeeper keeps a session (and so can open replies to what it sent in it)
/// after the session started: longer than any request waits (`max_wait_s` is capped at 30 s,
/// status queries at a few seconds). A reply that comes later has nobody waiting for it
/// anyway; after this window, even a full compromise of the gatekeeper opens none of the
/// session's replies.
pub const REPLY_WINDOW_MS: u64 = 120_000;

/// How often an idle gatekeeper forgets the sessions past the reply window.
pub const KEEP_SWEEP: std::time::Duration = std::time::Duration::from_secs(10);

/// Drops the sessions (oldest at the back) started longer than [`REPLY_WINDOW_MS`] before `now`.
fn forget_past_window(s: &mut VecDeque<Arc<Session>>, now: u64) {
    while s.back().is_some_and(|old| now.saturating_sub(old.started_at_ms()) > REPLY_WINDOW_MS) {
        s.pop_back();
    }
}

pub struct GatekeeperKeys {
    /// The certified key set served at `GET /v1/keys`, as the file holds it.
    worker_key_set: Option<String>,
    signing: SigningKey,
    worker_sealing: [u8; 32],
    /// The current session (front) and the earlier ones still inside [`REPLY_WINDOW_MS`].
    sessions: RwLock<VecDeque<Arc<Session>>>,
}

impl GatekeeperKeys {
    /// # Errors
    /// When a key file is missing or malformed.
    pub fn load(s: &KeySettings) -> Result<Self, KeyFileError> {
        let worker_sealing = keys::sealing_key(&s.worker_sealing_key)?;
        let signing = keys::signing_key(&s.signing_key)?;
        let session = Session::start(&signing, &worker_sealing, now_ms().unsigned_abs())
            .map_err(|e| KeyFileError::new(&s.worker_sealing_key, e))?;
        let worker_key_set = match &s.worker_key_set {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| KeyFileError::new(path, e))?;
                serde_json::from_str::<gatehouse_protocol::keyset::SignedKeySet>(&text)
                    .map_err(|e| KeyFileError::new(path, format!("not a certified key set: {e}")))?;
                Some(text)
            }
            None => None,
        };
        Ok(Self {
            worker_key_set,
            signing,
            worker_sealing,
            sessions: RwLock::new(VecDeque::from([Arc::new(session)])),
        })
    }

    /// The certified worker key set, if one is configured.
    pub fn worker_key_set(&self) -> Option<&str> {
        self.worker_key_set.as_deref()
    }

    /// The session to send in now; a new one every [`SESSION_LIFETIME_MS`].
    ///
    /// # Errors
    /// Without system randomness.
    pub fn session(&self) -> Result<Arc<Session>, CryptoError> {
        self.session_at(now_ms().unsigned_abs())
    }

    fn session_at(&self, now: u64) -> Result<Arc<Session>, CryptoError> {
        let current = |s: &Session| now.abs_diff(s.started_at_ms()) < SESSION_LIFETIME_MS;
        {
            let s = self.sessions.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = s.front().filter(|s| current(s)) {
                return Ok(s.clone());
            }
        }
        let mut s = self.sessions.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(fresh) = s.front().filter(|s| current(s)) {
            return Ok(fresh.clone());
        }
        let fresh = Arc::new(Session::start(&self.signing, &self.worker_sealing, now)?);
        s.push_front(fresh.clone());
        forget_past_window(&mut s, now);
        tracing::debug!("new session with the worker");
        Ok(fresh)
    }

    /// Forgets the sessions past the reply window, with their reply keys, also when no new
    /// session starts (an idle gatekeeper): called on a timer ([`KEEP_SWEEP`]).
    pub fn forget_expired(&self) {
        self.forget_at(now_ms().unsigned_abs());
    }

    fn forget_at(&self, now: u64) {
        forget_past_window(&mut self.sessions.write().unwrap_or_else(PoisonError::into_inner), now);
    }

    /// A session this gatekeeper started within the reply window, by [`Session::id`].
    pub fn recent(&self, id: &str) -> Option<Arc<Session>> {
        self.recent_at(id, now_ms().unsigned_abs())
    }

    fn recent_at(&self, id: &str, now: u64) -> Option<Arc<Session>> {
        let s = self.sessions.read().unwrap_or_else(PoisonError::into_inner);
        s.iter().find(|s| s.id() == id && now.saturating_sub(s.started_at_ms()) <= REPLY_WINDOW_MS).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys of a fresh dev set (in `dir`).
    fn dev_keys(dir: &std::path::Path) -> GatekeeperKeys {
        keys::write_dev(dir).unwrap();
        let settings = KeySettings {
            signing_key: dir.join("gatekeeper-signing.key"),
            worker_sealing_key: dir.join("worker-sealing.pub"),
            worker_key_set: Some(dir.join("worker-keys.json")),
        };
        GatekeeperKeys::load(&settings).unwrap()
    }

    #[test]
    fn a_session_and_its_reply_key_are_forgotten_after_the_reply_window() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dev_keys(dir.path());
        let first = keys.session().unwrap();
        let t0 = first.started_at_ms();
        // A later session takes over; replies to the first still open for a while...
        let later = keys.session_at(t0 + SESSION_LIFETIME_MS).unwrap();
        assert_ne!(later.id(), first.id());
        assert!(keys.recent_at(&first.id(), t0 + SESSION_LIFETIME_MS).is_some());
        // ... and not after the window: the key is gone from memory, not just refused.
        let much_later = t0 + REPLY_WINDOW_MS + SESSION_LIFETIME_MS;
        keys.session_at(much_later).unwrap();
        assert!(keys.recent_at(&first.id(), much_later).is_none());
        let kept = keys.sessions.read().unwrap().iter().map(|s| s.id()).collect::<Vec<_>>();
        assert!(!kept.contains(&first.id()), "the first session's keys are still held");
    }

    #[test]
    fn an_idle_gatekeeper_forgets_its_sessions_after_the_reply_window() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dev_keys(dir.path());
        let t0 = keys.session().unwrap().started_at_ms();
        keys.forget_at(t0 + REPLY_WINDOW_MS / 2);
        assert_eq!(keys.sessions.read().unwrap().len(), 1, "forgotten inside the window");
        // No request since: the timer alone drops the session and its reply key.
        keys.forget_at(t0 + REPLY_WINDOW_MS + 1);
        assert!(keys.sessions.read().unwrap().is_empty(), "an idle gatekeeper kept its reply keys");
        // The next request starts a new session.
        assert!(keys.session().is_ok());
    }
}
