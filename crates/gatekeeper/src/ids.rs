//! Minting job ids that carry their owner.
//!
//! An id is 10 bytes of nonce and a 6-byte tag, `HMAC-SHA256(secret, client ‖ nonce)`. So the
//! gatekeeper can tell, without storage, whether an id was issued to the asking client: anyone
//! else's id (or a made-up one) answers 404, and one of the client's own that the worker has
//! not seen yet is `queued`. With an idempotency key the nonce is derived from
//! `(client, key)`, so the same client and key always give the same id.

use std::path::Path;

use gatehouse_protocol::JobId;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

const NONCE: usize = 10;

/// Mints and checks job ids.
pub struct IdMinter {
    key: hmac::Key,
    rng: SystemRandom,
}

/// The id secret file is missing or too short.
#[derive(Debug, thiserror::Error)]
#[error("job id secret {path}: {reason}")]
pub struct IdSecretError {
    path: String,
    reason: String,
}

impl IdMinter {
    /// Reads the secret (hex, at least 32 bytes) from `path`.
    ///
    /// # Errors
    /// When the file cannot be read, is not hex, or is shorter than 32 bytes.
    pub fn from_file(path: &Path) -> Result<Self, IdSecretError> {
        let err = |reason: String| IdSecretError { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let hex = text.trim();
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
            .collect();
        match bytes {
            Some(b) if b.len() >= 32 => Ok(Self::new(&b)),
            _ => Err(err("expected at least 64 hex digits".into())),
        }
    }

    pub fn new(secret: &[u8]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret), rng: SystemRandom::new() }
    }

    /// A fresh id for `client`; with `idempotency_key`, the one id that key always maps to.
    pub fn mint(&self, client: &str, idempotency_key: Option<&str>) -> JobId {
        let mut nonce = [0u8; NONCE];
        match idempotency_key {
            Some(k) => {
                let tag = self.sign(&[b"idem", client.as_bytes(), k.as_bytes()]);
                nonce.copy_from_slice(&tag.as_ref()[..NONCE]);
            }
            None => {
                // SystemRandom fails only without an OS RNG, where nothing would work anyway;
                // fall back to a derived nonce rather than panicking.
                if self.rng.fill(&mut nonce).is_err() {
                    let t = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos());
                    nonce.copy_from_slice(&self.sign(&[b"time", &t.to_le_bytes()]).as_ref()[..NONCE]);
                }
            }
        }
        let tag = self.sign(&[b"owner", client.as_bytes(), &nonce]);
        let mut raw = [0u8; 16];
        raw[..NONCE].copy_from_slice(&nonce);
        raw[NONCE..].copy_from_slice(&tag.as_ref()[..16 - NONCE]);
        JobId::from_bytes(raw)
    }

    /// Whether `id` was minted for `client`.
    pub fn is_owned_by(&self, id: &JobId, client: &str) -> bool {
        let raw = id.to_bytes();
        let expected = self.sign(&[b"owner", client.as_bytes(), &raw[..NONCE]]);
        // Constant-time comparison of the truncated tag.
        let diff =
            raw[NONCE..].iter().zip(&expected.as_ref()[..16 - NONCE]).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }

    /// HMAC over length-prefixed parts, so that ("ab","c") and ("a","bc") differ.
    fn sign(&self, parts: &[&[u8]]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        ctx.sign()
    }
}

impl std::fmt::Debug for IdMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdMinter([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_belong_to_their_client() {
        let m = IdMinter::new(&[7; 32]);
        let id = m.mint("alice", None);
        assert!(m.is_owned_by(&id, "alice"));
        assert!(!m.is_owned_by(&id, "bob"));
        assert!(!IdMinter::new(&[8; 32]).is_owned_by(&id, "alice"));
        assert_ne!(m.mint("alice", None), id);
    }

    #[test]
    fn idempotency_keys_map_to_one_id_per_client() {
        let m = IdMinter::new(&[7; 32]);
        assert_eq!(m.mint("alice", Some("k1")), m.mint("alice", Some("k1")));
        assert_ne!(m.mint("alice", Some("k1")), m.mint("alice", Some("k2")));
        assert_ne!(m.mint("alice", Some("k1")), m.mint("bob", Some("k1")));
        assert!(m.is_owned_by(&m.mint("bob", Some("k1")), "bob"));
    }
}
